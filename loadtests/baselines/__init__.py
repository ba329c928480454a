"""Baselines the benchmark compares rankgate against, doing the same work per request:
read the user's features from the Feast online store on Redis, score the same
candidates with the same ONNX model, return the top k."""
