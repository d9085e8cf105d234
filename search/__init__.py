"""The experiment layer: schema, Ray Tune search, MLflow tracking, export, command line."""
