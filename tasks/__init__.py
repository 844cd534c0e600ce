"""Prefect tasks: each wraps one cc_core step and logs it to MLflow (the only MLflow layer)."""
