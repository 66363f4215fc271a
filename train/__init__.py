"""covidct-train: fit the classifier on a folder per class (imports TensorFlow lazily)."""
