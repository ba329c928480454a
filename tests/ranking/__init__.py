"""The request path: the pipeline and its stages on real Redis, Feast and onnxruntime; routing; exploration; features."""
