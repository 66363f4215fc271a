"""The seeds' CNN, with their augmentation as layers that act only in training."""

from __future__ import annotations


def build_model(image_size: tuple[int, int], seed: int = 0):
    """Input uint8-range grey (H, W, 1) -> probability of the positive class.

    Rescaling to [0, 1] is the model's first layer, so the exported graph takes raw
    uint8 pixels. Shear 0.2, zoom 0.2 and horizontal flip are random layers: identity at
    inference, so they vanish from the exported graph.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*image_size, 1), name="image")
    x = layers.RandomShear(x_factor=0.2, y_factor=0.2, fill_mode="constant", seed=seed)(inputs)
    x = layers.RandomZoom(0.2, fill_mode="constant", seed=seed)(x)
    x = layers.RandomFlip("horizontal", seed=seed)(x)
    x = layers.Rescaling(1.0 / 255.0)(x)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5, seed=seed)(x)
    x = layers.Dense(128, activation="relu")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    model = keras.Model(inputs, outputs, name="covidct_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
    return model


def load_trained(path, image_size: tuple[int, int]):
    """Load a model written by covidct-train.

    ``keras.models.load_model`` cannot read it back: Keras 3.15's RandomShear saves its factor
    as ``[-0.2, 0.2]`` and then rejects the negative bound on load. The architecture is ours,
    so rebuild it and load the weights from the same ``.keras`` file.
    """
    model = build_model(image_size)
    model.load_weights(path)
    return model
