"""Image inputs in the API workers: sources (base64, URLs, s3://), guards and budgets, decode and
resize. Builds on the model side's resample; knows nothing of HTTP routes or answers."""
