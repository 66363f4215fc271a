"""The networks covidct-train fits: a compact residual CNN (the default) and the seeds' CNN.

Both take uint8-range grey (H, W, 1) and return the probability of the positive class. Rescaling
to [0, 1] is the first layer, so the exported graph takes raw uint8 pixels.
"""

from __future__ import annotations

#: Architecture names accepted by ``--arch``; the first is the default.
ARCHITECTURES = ("compact", "seed")
#: Suffix of an architecture whose head is a linear probe over pooled feature statistics (``with_probe``):
#: what ``covidct-train --init --adapt probe`` writes. Not a training choice: ``--arch`` takes ARCHITECTURES.
#: "2": the probe pools each map's mean and maximum. Probes written before pooled mean and standard
#: deviation into a head of the same width, so loading one into today's graph would score silently wrong;
#: RETIRED_PROBES refuses them by name instead.
PROBE = "+probe2"
RETIRED_PROBES = ("+probe",)
#: Every architecture ``load_trained`` rebuilds.
REBUILDS = ARCHITECTURES + tuple(a + PROBE for a in ARCHITECTURES)

#: Channels of the compact network: a stride-2 stem, then one residual block per stage, each
#: halving the resolution. 1.2M parameters; the cost per image is measured in benchmarks/.
COMPACT_WIDTHS = (16, 32, 64, 128, 256)

#: BatchNorm's moving statistics must settle within an epoch of a small data set: 434 training
#: images are 14 steps of 32. With Keras' default momentum (0.99) the moving variance still held
#: ~12% of its initial 1.0 after 15 epochs and inference scored anti-correlated with training
#: (AUC 0.19 against 0.93 in training mode on the same batch). 0.9 forgets in ~10 steps.
BN_MOMENTUM = 0.9


def _bn(x, site):
    """BatchNorm shared by every site, or one per site (``site``: the one-hot site input)."""
    from keras import layers
    if site is None:
        return layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    return site_batch_norm(site.shape[-1])([x, site])


def _conv_bn_relu(x, channels, kernel=3, strides=1, site=None):
    from keras import layers
    x = layers.Conv2D(channels, kernel, strides=strides, padding="same", use_bias=False)(x)
    x = _bn(x, site)
    return layers.ReLU()(x)


def _residual(x, channels, strides, site=None):
    from keras import layers
    y = _conv_bn_relu(x, channels, 3, strides, site)
    y = layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
    y = _bn(y, site)
    if strides != 1 or x.shape[-1] != channels:
        x = layers.Conv2D(channels, 1, strides=strides, use_bias=False)(x)
        x = _bn(x, site)
    return layers.ReLU()(layers.Add()([x, y]))


#: Feature-statistics mixing (MixStyle, Zhou et al., ICLR 2021) after the stem and the first two stages, where
#: the features carry a site's style (contrast, texture, noise) more than its content: each slice's
#: channel means and deviations are, with probability ``p``, mixed with another slice's of the batch
#: (a Beta(alpha, alpha) weight). Training only: identity at inference, so the exported graph has no trace.
MIXSTYLE = {"p": 0.5, "alpha": 0.1, "after": (0, 1, 2)}


def mix_style(p: float = MIXSTYLE["p"], alpha: float = MIXSTYLE["alpha"], seed: int = 0, eps: float = 1e-6):
    import keras
    from keras import ops

    class MixStyle(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, x, training=None):
            if not training:
                return x
            n = ops.shape(x)[0]
            mu = ops.stop_gradient(ops.mean(x, axis=(1, 2), keepdims=True))
            sig = ops.stop_gradient(ops.sqrt(ops.var(x, axis=(1, 2), keepdims=True) + eps))
            lam = keras.random.beta((n, 1, 1, 1), alpha, alpha, seed=self.seed_generator)
            perm = keras.random.shuffle(ops.arange(n), seed=self.seed_generator)
            mu_mix = lam * mu + (1 - lam) * ops.take(mu, perm, axis=0)
            sig_mix = lam * sig + (1 - lam) * ops.take(sig, perm, axis=0)
            mixed = (x - mu) / sig * sig_mix + mu_mix
            apply = keras.random.uniform((n, 1, 1, 1), seed=self.seed_generator) < p
            return ops.where(apply, mixed, x)

        def compute_output_shape(self, input_shape):
            return input_shape

    return MixStyle()


def build_compact(image_size: tuple[int, int], seed: int = 0, dropout: float = 0.3, sites: int = 0,
                  mixstyle: bool = True):
    """Stem conv, four residual stages, global average pooling, dropout, sigmoid.

    Global pooling makes the decision from what the features find wherever it is, not from where
    it sits in the frame (a Dense layer over a flattened map learns positions: a site's framing).
    With ``sites`` > 1 the model also takes a one-hot ``site`` input and every BatchNorm keeps one set
    of statistics and affine parameters per site (training only: ``merge_site_norms`` turns it into
    the plain model that is exported).
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*image_size, 1), name="image")
    site = keras.Input((sites,), name="site") if sites > 1 else None
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    def styled(x, stage):  # stage 0 is the stem
        return mix_style(seed=seed + stage)(x) if mixstyle and stage in MIXSTYLE["after"] else x

    x = styled(_conv_bn_relu(x, COMPACT_WIDTHS[0], 3, 2, site), 0)
    for stage, channels in enumerate(COMPACT_WIDTHS[1:], 1):
        x = styled(_residual(x, channels, 2, site), stage)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout, seed=seed)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model([inputs, site] if site is not None else inputs, outputs, name="covidct_compact")


def site_batch_norm(n_sites: int, momentum: float = BN_MOMENTUM, epsilon: float = 1e-3):
    """A BatchNorm layer with one set of moving statistics and affine parameters per site (Chang et al. 2019,
    domain-specific BatchNorm; Wang, Liu & Dou 2020 on these two public sets): in training each site's
    slices are normalised with their own batch statistics, so the shared convolutions see every site alike."""
    import keras
    from keras import ops

    class SiteBatchNorm(keras.layers.Layer):
        def build(self, input_shape):
            c = input_shape[0][-1]
            self.gamma = self.add_weight(shape=(n_sites, c), initializer="ones", name="gamma")
            self.beta = self.add_weight(shape=(n_sites, c), initializer="zeros", name="beta")
            self.moving_mean = self.add_weight(shape=(n_sites, c), initializer="zeros", trainable=False,
                                               name="moving_mean")
            self.moving_variance = self.add_weight(shape=(n_sites, c), initializer="ones", trainable=False,
                                                   name="moving_variance")

        def call(self, inputs, training=None):
            x, oh = inputs
            oh = ops.cast(oh, x.dtype)
            if training:
                cnt = ops.sum(oh, axis=0)
                safe = ops.maximum(cnt, 1.0)[:, None]
                mean = ops.matmul(ops.transpose(oh), ops.mean(x, axis=(1, 2))) / safe
                sq = ops.matmul(ops.transpose(oh), ops.mean(ops.square(x), axis=(1, 2))) / safe
                var = ops.maximum(sq - ops.square(mean), 0.0)
                seen = ops.cast(cnt > 0, x.dtype)[:, None] * (1.0 - momentum)
                self.moving_mean.assign(self.moving_mean * (1.0 - seen) + ops.stop_gradient(mean) * seen)
                self.moving_variance.assign(self.moving_variance * (1.0 - seen) + ops.stop_gradient(var) * seen)
            else:
                mean, var = self.moving_mean, self.moving_variance
            m = ops.matmul(oh, mean)[:, None, None, :]
            v = ops.matmul(oh, var)[:, None, None, :]
            g = ops.matmul(oh, self.gamma)[:, None, None, :]
            b = ops.matmul(oh, self.beta)[:, None, None, :]
            return (x - m) * ops.rsqrt(v + epsilon) * g + b

        def compute_output_shape(self, input_shape):
            return input_shape[0]

    return SiteBatchNorm()


def merge_site_norms(site_model, image_size: tuple[int, int], seed: int = 0):
    """The plain model (no site input) with the site model's weights: convolutions and head as trained, and
    each BatchNorm the equal-weight mixture of the sites' (mean of means; mean of variances plus the
    variance of the means; mean affine parameters). What a site never seen gets."""
    import numpy as np

    plain = build_compact(image_size, seed)
    src = [l for l in site_model.layers if l.weights]
    dst = [l for l in plain.layers if l.weights]
    if len(src) != len(dst):
        raise ValueError(f"site model has {len(src)} weighted layers, the plain one {len(dst)}")
    for a, b in zip(src, dst):
        if type(b).__name__ == "BatchNormalization":
            gamma, beta, mm, mv = (np.asarray(w) for w in (a.gamma, a.beta, a.moving_mean, a.moving_variance))
            b.set_weights([gamma.mean(0), beta.mean(0), mm.mean(0), mv.mean(0) + mm.var(0)])
        else:
            b.set_weights(a.get_weights())
    return plain


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


def feature_layers(model) -> list:
    """The layers whose outputs the probe pools: every rectified feature map (ReLU layers, and Conv2D
    layers with a ReLU activation) after the first, in the model's order. The first (the compact stem's,
    96x96x16 at the default size) is the largest map, a third of the pooled volume, and its statistics
    added nothing measured (UCSD's unseen slices from 104 local ones: 0.783 with it and without)."""
    import keras

    out = []
    for layer in model.layers:
        if len(layer.output.shape) != 4:
            continue
        relu = isinstance(layer, keras.layers.ReLU) or (
            isinstance(layer, keras.layers.Conv2D) and getattr(layer.activation, "__name__", "") == "relu")
        if relu:
            out.append(layer)
    return out[1:] if len(out) > 1 else out


def pooled_stats(name: str):
    """A layer: (batch, h, w, c) to (batch, 2c), each channel's mean and maximum over the map.

    Two reductions a map, as the mean and standard deviation it replaced. Measured on the two shared
    sites (README, trust section), paired over 8 seeds of the local draw against mean and standard
    deviation: the unseen AUC rose at 20, 50, 100 and 200 local slices in both directions of adaptation."""
    import keras
    from keras import ops

    class PooledStats(keras.layers.Layer):
        def call(self, x):
            return ops.concatenate([ops.mean(x, axis=(1, 2)), ops.max(x, axis=(1, 2))], axis=-1)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], 2 * input_shape[-1])

    return PooledStats(name=name)


def probe_features(model):
    """(feature model, its width): the concatenated pooled statistics of ``feature_layers(model)``."""
    import keras

    stats = [pooled_stats(f"stats_{i}")(layer.output) for i, layer in enumerate(feature_layers(model))]
    x = keras.layers.Concatenate(name="probe_features")(stats) if len(stats) > 1 else stats[0]
    return keras.Model(model.inputs, x, name=model.name + "_features"), int(x.shape[-1])


def with_probe(model):
    """``model``'s feature extractor with a new head: one sigmoid unit over ``probe_features`` (Kornblith et
    al. 2019, Kumar et al. 2022: a linear probe on frozen features holds up where few labels fine-tune a
    network into over-fitting). Its weights are set by ``train.adapt``; the output keeps the name
    "probability", so the exported graph has the contract's input and output."""
    import keras

    features, _ = probe_features(model)
    out = keras.layers.Dense(1, activation="sigmoid", name="probability")(features.output)
    return keras.Model(model.inputs, out, name=model.name + "_probe")


def build_model(image_size: tuple[int, int], seed: int = 0, arch: str = "seed", mixstyle: bool = True):
    """The named architecture (uncompiled for "compact": its optimizer depends on the schedule)."""
    if arch.endswith(PROBE) and arch[:-len(PROBE)] in ARCHITECTURES:
        return with_probe(build_model(image_size, seed, arch[:-len(PROBE)], mixstyle))
    for old in RETIRED_PROBES:
        if arch.endswith(old) and arch[:-len(old)] in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is a probe written by an earlier covidct-batch, whose head "
                             "read other pooled statistics (mean and standard deviation) than today's; adapt again "
                             "from its source run (covidct-train LOCAL_DIR --init SOURCE_RUN)")
    if arch == "compact":
        return build_compact(image_size, seed, mixstyle=mixstyle)
    if arch == "seed":
        return build_seed(image_size, seed)
    raise ValueError(f"arch must be one of {list(REBUILDS)}; got {arch!r}")


def load_trained(path, image_size: tuple[int, int], arch: str = "seed"):
    """Load a model written by covidct-train.

    ``keras.models.load_model`` cannot read the seeds' model back: Keras 3.15's RandomShear saves
    its factor as ``[-0.2, 0.2]`` and then rejects the negative bound on load. The architectures
    are ours, so rebuild the named one and load the weights from the same ``.keras`` file.
    """
    model = build_model(image_size, arch=arch)
    model.load_weights(path)
    return model
