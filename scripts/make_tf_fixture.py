"""Writes tests/fixtures/metaf2n_tf/: a small MetaF2N checkpoint saved by TensorFlow's own Saver, with the official
test step's outputs, for tests/test_convert_tf.py. Needs TensorFlow, which metaf2n never does:

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 scikit-image
    /tmp/tfenv/bin/python scripts/make_tf_fixture.py

The graph follows the official code's structure (yinzhicun/MetaF2N, model/model.py and test.py), written here from
its description: RRDBNet under scope MODEL (SAME 3x3 convolutions with bias, leaky ReLU 0.2 after conv1-4 of each
dense block and after conv_up1/conv_up2/conv_hr, residual scale 0.2, trunk skip, tf.repeat x2 upsampling twice),
MaskNet under scope Mask (conv1-7 with ReLU, conv8, then ReLU) on concat(resize_bicubic(lq, hq size), hq), the inner
loss mean(W * |hq - SR(lq)|), one GradientDescentOptimizer(0.01) step on the MODEL variables only, and the whole LQ
photo in one pass. Sizes are small (2 blocks, 8 features, growth 4, MaskNet 8) so the fixture stays tiny; Adam
slots and a global step are saved too, as in a training checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
import tensorflow as tf

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "metaf2n_tf"
NUM_FEAT, NUM_BLOCK, GROW, MASK_FEAT = 8, 2, 4, 8
PATCHES, LR_PATCH = 4, 16  # the official test draws 16 per face; 4 keep the fixture small


def area_downscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb[: h * factor, : w * factor].astype(np.float64).reshape(h, factor, w, factor, 3)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def conv(x, scope, cin, cout, rng, act=None, kernel_name="weight", std=0.3, bias_value=None):
    with tf.compat.v1.variable_scope(scope):
        kernel = tf.compat.v1.get_variable(kernel_name, initializer=(rng.standard_normal((3, 3, cin, cout)) * std /
                                                                     np.sqrt(cin)).astype(np.float32))
        bias0 = rng.standard_normal(cout) * 0.05 if bias_value is None else np.full(cout, bias_value)
        bias = tf.compat.v1.get_variable("bias", initializer=bias0.astype(np.float32))
    y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides=[1, 1, 1, 1], padding="SAME"), bias)
    if act == "lrelu":
        return tf.nn.leaky_relu(y, 0.2)
    if act == "relu":
        return tf.nn.relu(y)
    return y


def sr_network(x, rng):
    with tf.compat.v1.variable_scope("MODEL", reuse=tf.compat.v1.AUTO_REUSE):
        first = conv(x, "conv_first", 3, NUM_FEAT, rng)
        trunk = first
        for i in range(NUM_BLOCK):
            block_in = trunk
            y = trunk
            for j in range(1, 4):
                features = [y]
                for k in range(1, 5):
                    features.append(conv(tf.concat(features, 3), f"body/{i}/rdb{j}/conv{k}", NUM_FEAT + (k - 1) * GROW,
                                         GROW, rng, "lrelu"))
                y = conv(tf.concat(features, 3), f"body/{i}/rdb{j}/conv5", NUM_FEAT + 4 * GROW, NUM_FEAT, rng) * 0.2 + y
            trunk = y * 0.2 + block_in
        feat = first + conv(trunk, "conv_body", NUM_FEAT, NUM_FEAT, rng)
        for name in ("conv_up1", "conv_up2"):
            feat = tf.repeat(tf.repeat(feat, 2, axis=1), 2, axis=2)
            feat = conv(feat, name, NUM_FEAT, NUM_FEAT, rng, "lrelu")
        feat = conv(feat, "conv_hr", NUM_FEAT, NUM_FEAT, rng, "lrelu")
        return conv(feat, "conv_last", NUM_FEAT, 3, rng)


def mask_network(x, rng):
    with tf.compat.v1.variable_scope("Mask", reuse=tf.compat.v1.AUTO_REUSE):
        for k in range(1, 8):
            x = conv(x, f"conv{k}", 6 if k == 1 else MASK_FEAT, MASK_FEAT, rng, "relu", "kernel", std=1.0)
        return tf.nn.relu(conv(x, "conv8", MASK_FEAT, 1, rng, None, "kernel", std=0.5, bias_value=1.0))


def main() -> None:
    tf.compat.v1.disable_eager_execution()
    rng = np.random.default_rng(0)
    astronaut = skimage.data.astronaut()
    photo = area_downscale(astronaut[0:96, 120:216], 4)  # 24 x 24 LQ photo
    face_hq = astronaut[40:136, 160:256]  # 96 x 96 "restored" face
    face_lq = area_downscale(face_hq, 4)  # 24 x 24
    tops = rng.integers(0, face_lq.shape[0] - LR_PATCH, PATCHES)  # the official randrange: upper bound excluded
    lefts = rng.integers(0, face_lq.shape[1] - LR_PATCH, PATCHES)
    lq = np.stack([face_lq[t : t + LR_PATCH, l : l + LR_PATCH] for t, l in zip(tops, lefts)]) / 255
    hq = np.stack([face_hq[4 * t : 4 * t + 64, 4 * l : 4 * l + 64] for t, l in zip(tops, lefts)]) / 255

    inputa = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
    labela = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
    output = sr_network(inputa, rng)
    up = tf.compat.v1.image.resize_bicubic(inputa, tf.shape(labela)[1:3], align_corners=False)
    weights = mask_network(tf.concat([up, labela], 3), rng)
    loss = tf.reduce_mean(weights * tf.abs(labela - output))
    model_vars = tf.compat.v1.trainable_variables("MODEL")
    step = tf.compat.v1.train.GradientDescentOptimizer(0.01).minimize(loss, var_list=model_vars)
    global_step = tf.compat.v1.train.get_or_create_global_step()
    # a training checkpoint's extras: Adam slots (for one variable, to keep the file small) and a global step
    tf.compat.v1.train.AdamOptimizer(1e-4).minimize(loss, global_step=global_step, var_list=model_vars[:1])
    saver = tf.compat.v1.train.Saver()
    OUT.mkdir(parents=True, exist_ok=True)
    with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        saver.save(session, str(OUT / "model"), write_meta_graph=False, write_state=False)
        photo_in = photo[None] / 255
        sr_before = session.run(output, {inputa: photo_in})
        w, loss_before, up_values = session.run([weights, loss, up], {inputa: lq, labela: hq})
        session.run(step, {inputa: lq, labela: hq})
        sr_after = session.run(output, {inputa: photo_in})
    np.savez_compressed(OUT / "official_test.npz", photo=photo, face_lq=face_lq, face_hq=face_hq, tops=tops,
                        lefts=lefts, sr_before=sr_before[0], weights=w, loss_before=loss_before,
                        bicubic=up_values, sr_after=sr_after[0])
    print(f"wrote {OUT}: SR in [{sr_before.min():.3f}, {sr_before.max():.3f}], W mean {w.mean():.3f}, "
          f"inner loss {loss_before:.5f}, SR change after one step {np.abs(sr_after - sr_before).max():.2e}")


if __name__ == "__main__":
    main()
