"""dmlcore: the Deep Metric Learning trainer library (pure PyTorch; no Ray, no MLflow)."""

__version__ = "0.1.0"
