"""The explorer page: self-contained (no network), and in headless Chromium a hover draws
the example, a click filters the table, a header click sorts it, a flag box filters by
issue type; no console errors. The audit command writes it."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from gradsift.explorer import write_explorer

from .test_report import browser  # noqa: F401  (the headless Chromium fixture)


def small_table(n=40, seed=0):
    g = np.random.default_rng(seed)
    t = pd.DataFrame({"given_label": g.integers(0, 3, n), "label_score": g.random(n), "is_label": g.random(n) < 0.2,
                      "suggested_label": g.integers(0, 3, n), "outlier_score": g.normal(size=n),
                      "is_outlier": np.zeros(n, bool), "confidence": g.random(n), "variability": g.random(n) * 0.3},
                     index=pd.Index(np.arange(100, 100 + n), name="example_id"))
    return t, g.random((n, 64)).astype(np.float32)


def test_page_is_self_contained(tmp_path):
    t, x = small_table()
    html = write_explorer(t, tmp_path / "e.html", inputs=x, shape=(8, 8)).read_text()
    assert "https://" not in html.split("<script>")[0] and "<script src" not in html
    assert "Plotly" in html and '"example_id"' in html


def test_explorer_in_chromium(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    t, x = small_table()
    path = write_explorer(t, tmp_path / "e.html", inputs=x, shape=(8, 8))
    browser.get_log("browser")
    browser.get(path.resolve().as_uri())
    browser.execute_script("return 1")
    for _ in range(100):
        if browser.execute_script("return window.explorerReady === true"):
            break
        browser.implicitly_wait(0.1)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#body tr")) == 40
    point = browser.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace .points path")[0]
    ActionChains(browser).move_to_element(point).perform()  # hover: the example is drawn
    drawn = browser.execute_script("return document.querySelectorAll('#example-drawing rect').length")
    assert drawn == 64, browser.find_element(By.ID, "example").text
    ActionChains(browser).move_to_element(point).click().perform()  # click: the table shows that example
    rows = browser.find_elements(By.CSS_SELECTOR, "#body tr")
    assert len(rows) == 1
    browser.find_element(By.ID, "reset").click()
    header = browser.find_element(By.CSS_SELECTOR, 'th[data-col="2"]')  # label_score, sorted descending
    header.click()
    first = [float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in browser.find_elements(By.CSS_SELECTOR, "#body tr")]
    assert first == sorted(first, reverse=True)
    browser.find_element(By.CSS_SELECTOR, 'input.flag[value="is_label"]').click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#body tr")) == int(t.is_label.sum())
    errors = [m for m in browser.get_log("browser") if m["level"] in ("SEVERE", "WARNING")]
    assert errors == []


def test_audit_command_writes_table_summary_map_and_explorer(tmp_path):
    import json

    from gradsift.cli import app

    out = tmp_path / "audit"
    r = CliRunner().invoke(app, ["audit", "--dataset", "digits", "--label-noise", "symmetric", "--noise-rate", "0.1",
                                 "--epochs", "3", "--folds", "2", "--width", "16", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["injected"]["label_errors"] == 140 and summary["injected"]["auroc"] > 0.7
    table = pd.read_parquet(out / "audit.parquet").set_index("example_id")
    assert table.index.is_unique and {"is_label", "is_outlier", "is_near_duplicate"} <= set(table.columns)
    assert (out / "datamap.png").stat().st_size > 10_000 and (out / "explorer.html").stat().st_size > 1_000_000
