"""The HTTP side: request and response schemas, the JSON error responses, and the ASGI layers
(traffic guard, waiting bodies, API key, raw images, JSON Lines, spans, recycling, the demo page).
"""
