"""Integrations with other training frameworks (imported on demand, each needs its own
package): :mod:`gradsift.integrations.huggingface` (``SiftTrainer``)."""
