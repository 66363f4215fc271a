"""The networks covidct-train fits: a compact residual CNN (the default) and the seeds' CNN.

Both take uint8-range grey (H, W, 1) and return the probability of the positive class. Rescaling
to [0, 1] is the first layer, so the exported graph takes raw uint8 pixels.
"""

from __future__ import annotations

#: Architecture names accepted by ``--arch``; the first is the default.
ARCHITECTURES = ("compact", "seed")

#: Channels of the compact network: a stride-2 stem, then one residual block per stage, each
#: halving the resolution. 1.2M parameters; the cost per image is measured in benchmarks/.
COMPACT_WIDTHS = (16, 32, 64, 128, 256)

#: BatchNorm's moving statistics must settle within an epoch of a small data set: 434 training
#: images are 14 steps of 32. With Keras' default momentum (0.99) the moving variance still held
#: ~12% of its initial 1.0 after 15 epochs and inference scored anti-correlated with training
#: (AUC 0.19 against 0.93 in training mode on the same batch). 0.9 forgets in ~10 steps.
BN_MOMENTUM = 0.9


def _conv_bn_relu(x, channels, kernel=3, strides=1):
    from keras import layers
    x = layers.Conv2D(channels, kernel, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    return layers.ReLU()(x)


def _residual(x, channels, strides):
    from keras import layers
    y = _conv_bn_relu(x, channels, 3, strides)
    y = layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM)(y)
    if strides != 1 or x.shape[-1] != channels:
        x = layers.Conv2D(channels, 1, strides=strides, use_bias=False)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    return layers.ReLU()(layers.Add()([x, y]))


def build_compact(image_size: tuple[int, int], seed: int = 0, dropout: float = 0.3):
    """Stem conv, four residual stages, global average pooling, dropout, sigmoid.

    Global pooling makes the decision from what the features find wherever it is, not from where
    it sits in the frame (a Dense layer over a flattened map learns positions: a site's framing).
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*image_size, 1), name="image")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = _conv_bn_relu(x, COMPACT_WIDTHS[0], 3, 2)
    for channels in COMPACT_WIDTHS[1:]:
        x = _residual(x, channels, 2)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout, seed=seed)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name="covidct_compact")


def build_seed(image_size: tuple[int, int], seed: int = 0):
    """The seeds' CNN, exactly: their shear/zoom/flip augmentation as layers that act only in
    training (identity at inference, so they vanish from the exported graph), Conv 32 / MaxPool /
    Conv 64 / MaxPool / Flatten / Dropout 0.5 / Dense 128 / sigmoid, compiled with Adam 1e-4."""
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


def build_model(image_size: tuple[int, int], seed: int = 0, arch: str = "seed"):
    """The named architecture (uncompiled for "compact": its optimizer depends on the schedule)."""
    if arch == "compact":
        return build_compact(image_size, seed)
    if arch == "seed":
        return build_seed(image_size, seed)
    raise ValueError(f"arch must be one of {list(ARCHITECTURES)}; got {arch!r}")


def load_trained(path, image_size: tuple[int, int], arch: str = "seed"):
    """Load a model written by covidct-train.

    ``keras.models.load_model`` cannot read the seeds' model back: Keras 3.15's RandomShear saves
    its factor as ``[-0.2, 0.2]`` and then rejects the negative bound on load. The architectures
    are ours, so rebuild the named one and load the weights from the same ``.keras`` file.
    """
    model = build_model(image_size, arch=arch)
    model.load_weights(path)
    return model
