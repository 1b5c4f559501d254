"""Run every benchmark and print its table: ``python -m benchmarks.run_all``.

Threads: ``GRADSIFT_BENCH_THREADS`` (default 1, as the machine's cores are shared).
"""

from . import aggregators, ensemble, per_example


def main() -> None:
    for text in (per_example.run("grads"), per_example.run("norms"), aggregators.run(), ensemble.run()):
        print(text, end="\n\n", flush=True)


if __name__ == "__main__":
    main()
