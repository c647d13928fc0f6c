"""The sweep service: Ray Tune + Optuna over GOPC-2 stabilizers, every trial tracked in MLflow."""
