"""The anomaly model: frozen backbone, pre-processing, scorer networks and the model file."""
