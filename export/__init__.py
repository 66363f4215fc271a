"""covidct-export: Keras to ONNX with the preprocessing contract inside (imports TensorFlow lazily)."""
