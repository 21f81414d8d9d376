"""Tests of the CIFAR input pipelines on the tiny files in testdata/.

Expected arrays come from testdata/make_testdata.py, which is deterministic.
Nothing here reads the real CIFAR data or the network, except the optional
`RealCifar10Test`, which runs only if $ENTROPY_SGD_CIFAR10_DIR is set.
"""

import gzip
import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from entropy_sgd.core import distribution
from entropy_sgd.workloads import data

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                        "testdata")
FOLDERS = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}
BATCH = 20


def _load_generator():
  path = os.path.join(TESTDATA, "make_testdata.py")
  spec = importlib.util.spec_from_file_location("make_testdata", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


generator = _load_generator()


def make_data(dataset="cifar10", compressed=False, **overrides):
  kwargs = dict(dataset=dataset, batch_size=BATCH, augment="none",
                data_dir=os.path.join(TESTDATA,
                                      dataset + ("_gz" if compressed else "")))
  kwargs.update(overrides)
  return data.CifarData(data.PipelineConfig(**kwargs))


def take(dataset, num_batches=None):
  """Concatenated numpy (images, labels) of the first `num_batches`."""
  if num_batches is not None:
    dataset = dataset.take(num_batches)
  batches = list(dataset.as_numpy_iterator())
  return (np.concatenate([b[0] for b in batches]),
          np.concatenate([b[1] for b in batches]))


def normalised(cifar, images_uint8):
  """What the pipeline should output for un-augmented uint8 images."""
  return (images_uint8.astype(np.float32) / 255.0 - cifar.mean) / cifar.std


def to_uint8(cifar, images):
  """Inverts the normalisation of un-augmented images (exact up to rounding)."""
  pixels = (images * cifar.std + cifar.mean) * 255.0
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  return np.round(pixels).astype(np.uint8)


def multiset(images_uint8, labels):
  return sorted(zip(labels.tolist(), (im.tobytes() for im in images_uint8)))


def write_cifar10(directory, images, labels):
  """Writes `images` as each training file and as the test file."""
  folder = os.path.join(directory, FOLDERS["cifar10"])
  os.makedirs(folder)
  records = generator.to_records(images, labels)
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    with open(os.path.join(folder, name), "wb") as f:
      f.write(records)
  return directory


class ParsingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(dataset=["cifar10", "cifar100"],
                         compressed=[False, True])
  def test_splits_match_the_generator(self, dataset, compressed):
    cifar = make_data(dataset, compressed, shuffle_buffer=1)  # In order.
    train_images, train_labels, _ = generator.make_split(dataset, "train")
    test_images, test_labels, _ = generator.make_split(dataset, "test")
    self.assertEqual(cifar.num_examples("train"), len(train_labels))
    self.assertEqual(cifar.num_examples("test"), len(test_labels))

    images, labels = take(cifar.eval_dataset("test"))
    self.assertAllEqual(labels, test_labels)
    self.assertAllClose(images, normalised(cifar, test_images), atol=1e-5)

    images, labels = take(cifar.train_dataset(), cifar.steps_per_epoch)
    count = cifar.steps_per_epoch * BATCH
    self.assertAllEqual(labels, train_labels[:count])
    self.assertAllClose(images, normalised(cifar, train_images[:count]),
                        atol=1e-5)

  def test_generator_reproduces_the_files(self):
    root = self.create_tempdir().full_path
    generator.write_all(root)
    for directory, _, names in os.walk(root):
      for name in names:
        path = os.path.join(directory, name)
        with open(path, "rb") as new, open(
            os.path.join(TESTDATA, os.path.relpath(path, root)), "rb") as old:
          self.assertEqual(new.read(), old.read(), path)

  def test_data_dir_may_be_the_layout_folder(self):
    direct = make_data(data_dir=os.path.join(TESTDATA, "cifar10",
                                             FOLDERS["cifar10"]))
    parent = make_data()
    self.assertAllEqual(take(direct.eval_dataset())[0],
                        take(parent.eval_dataset())[0])

  def test_shapes_and_dtypes(self):
    cifar = make_data(augment="flip_crop_rotate")
    images, labels = next(iter(cifar.train_dataset()))
    self.assertEqual(images.shape, [BATCH, 32, 32, 3])
    self.assertEqual(images.dtype, tf.float32)
    self.assertEqual(labels.shape, [BATCH])
    self.assertEqual(labels.dtype, tf.int32)
    self.assertEqual(cifar.train_dataset().element_spec[0].shape,
                     [BATCH, 32, 32, 3])
    # 50 test images: two full batches and the remainder.
    sizes = [len(labels) for _, labels in cifar.eval_dataset("test")]
    self.assertEqual(sizes, [20, 20, 10])
    self.assertEqual(data.num_classes("cifar100"), 100)


class NormalisationAndHoldoutTest(tf.test.TestCase):

  def test_statistics_are_numpys_over_the_training_part(self):
    cifar = make_data(validation_examples=20)
    images, _, _ = generator.make_split("cifar10", "train")
    pixels = images[:180].astype(np.float64) / 255.0
    self.assertAllClose(cifar.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-6)
    self.assertAllClose(cifar.std, pixels.std(axis=(0, 1, 2)), atol=1e-6)

  def test_a_shared_statistics_cache_fits_once(self):
    config = data.PipelineConfig(
        batch_size=BATCH, augment="none",
        data_dir=os.path.join(TESTDATA, "cifar10"), validation_examples=20)
    cache = {}
    with self.assertLogs(level="INFO") as logs:
      first = data.ImageData(config, cache)
      second = data.ImageData(config, cache)
      data.ImageData(config)  # No cache: fitted again, and not stored.
    fits = [line for line in logs.output if "training images: mean" in line]
    self.assertLen(fits, 2)
    self.assertLen(cache, 1)
    self.assertIs(second.mean, first.mean)

  def test_training_epoch_is_standardised(self):
    cifar = make_data(validation_examples=20)
    images, _ = take(cifar.train_dataset(), cifar.steps_per_epoch)
    self.assertEqual(len(images), 180)
    self.assertAllClose(images.mean(axis=(0, 1, 2)), np.zeros(3), atol=1e-4)
    self.assertAllClose(images.std(axis=(0, 1, 2)), np.ones(3), atol=1e-4)

  def test_validation_is_the_held_out_tail(self):
    cifar = make_data(validation_examples=20)
    expected_images, expected_labels, _ = generator.make_split(
        "cifar10", "train")
    self.assertEqual(cifar.num_examples("train"), 180)
    self.assertEqual(cifar.num_examples("validation"), 20)
    self.assertEqual(cifar.steps_per_epoch, 9)
    images, labels = take(cifar.eval_dataset("validation"))
    self.assertAllEqual(to_uint8(cifar, images), expected_images[180:])
    self.assertAllEqual(labels, expected_labels[180:])
    # One (shuffled) training epoch is exactly the first 180 images.
    images, labels = take(cifar.train_dataset(), 9)
    self.assertEqual(multiset(to_uint8(cifar, images), labels),
                     multiset(expected_images[:180], expected_labels[:180]))

  def test_bad_holdouts(self):
    with self.assertRaisesRegex(ValueError, "leaves no training data"):
      make_data(validation_examples=200)
    with self.assertRaisesRegex(ValueError, "validation_examples > 0"):
      make_data().eval_dataset("validation")


def svd_zca(images, bias=data.ZCA_BIAS):
  """ZCA from the SVD of the centred data (a different route than `fit_zca`).

  Y = (X - mean) / sqrt(n - 1) = U S V^T; cov = V S^2 V^T, so the whitening
  matrix is V diag(1 / (S + bias)) V^T.
  """
  mean = images.mean(axis=0)
  _, singular_values, vt = np.linalg.svd(
      (images - mean) / np.sqrt(len(images) - 1), full_matrices=False)
  return mean, vt.T @ np.diag(1.0 / (singular_values + bias)) @ vt


class GcnZcaTest(tf.test.TestCase):

  def test_global_contrast_normalisation(self):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(7, 30))
    images[3] = 17.0  # A constant image is only centred.
    out = data.global_contrast_normalize(images)
    self.assertAllClose(out.mean(axis=1), np.zeros(7), atol=1e-12)
    stds = out.std(axis=1, ddof=1)
    self.assertAllClose(np.delete(stds, 3), np.ones(6), atol=1e-12)
    self.assertAllEqual(out[3], np.zeros(30))
    # Invariant to brightness and contrast, per image.
    self.assertAllClose(data.global_contrast_normalize(3 * images + 40), out)

  def test_whitened_covariance_is_the_identity(self):
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(16, 16))
    images = rng.normal(size=(20_000, 16)) @ mixing + 5.0
    mean, matrix = data.fit_zca(images)
    whitened = np.cov((images - mean) @ matrix, rowvar=False)
    # Closed form: eigenvalues lambda / (sqrt(lambda) + bias)^2, so within
    # 2 bias / sqrt(lambda_min) of the identity.
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(images, rowvar=False))
    shrink = eigenvalues / (np.sqrt(eigenvalues) + data.ZCA_BIAS)**2
    self.assertAllClose(whitened, (eigenvectors * shrink) @ eigenvectors.T,
                        atol=1e-10)
    self.assertAllClose(whitened, np.eye(16), atol=2.5 * data.ZCA_BIAS /
                        np.sqrt(eigenvalues.min()))
    self.assertAllClose(matrix, matrix.T)  # ZCA is the symmetric whitening.

  def test_matches_the_svd_reference(self):
    rng = np.random.default_rng(2)
    images = rng.normal(size=(500, 24)) @ rng.normal(size=(24, 24))
    mean, matrix = data.fit_zca(images)
    expected_mean, expected_matrix = svd_zca(images)
    self.assertAllClose(mean, expected_mean, rtol=1e-12)
    self.assertAllClose(matrix, expected_matrix, rtol=1e-7, atol=1e-9)

  def test_fewer_images_than_dimensions_match_the_full_svd(self):
    # The Gram-matrix route against V diag(1 / (S + bias)) V^T over the full
    # SVD (V square, the d - n missing singular values 0); its round-off
    # singular values (~1e-14) stay far below the bias.
    rng = np.random.default_rng(3)
    images = rng.normal(size=(30, 80)) @ rng.normal(size=(80, 80)) + 2.0
    bias = 1e-3
    mean, matrix = data.fit_zca(images, bias=bias)
    _, singular_values, vt = np.linalg.svd(
        (images - images.mean(axis=0)) / np.sqrt(len(images) - 1))
    padded = np.zeros(80)
    padded[:len(singular_values)] = singular_values
    self.assertAllClose(mean, images.mean(axis=0), rtol=1e-12)
    self.assertAllClose(matrix, (vt.T / (padded + bias)) @ vt, rtol=1e-7,
                        atol=1e-9)
    # 29 whitened directions (rank n - 1), the other 51 scaled by 1 / bias.
    self.assertAllClose(np.sort(np.linalg.eigvalsh(matrix))[29:],
                        np.full(51, 1.0 / bias), rtol=1e-9)

  def test_pipeline_fits_on_the_training_split_only(self):
    cifar = make_data(preprocess="gcn_zca", validation_examples=20)
    images, _, _ = generator.make_split("cifar10", "train")
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    gcn = data.global_contrast_normalize(flat)
    # The mean is the training images' alone. (With 180 images in 3072
    # dimensions the matrix is singular but for the bias: `fit_zca` itself is
    # checked against the SVD route above, also for fewer images than
    # dimensions.)
    self.assertAllClose(cifar.mean, gcn[:180].mean(axis=0), atol=1e-6)
    with_holdout_in = make_data(preprocess="gcn_zca")
    self.assertNotAllClose(with_holdout_in.mean, cifar.mean)

  def test_evaluation_matches_numpy(self):
    cifar = make_data(preprocess="gcn_zca")
    images, _, _ = generator.make_split("cifar10", "train")
    out, _ = take(cifar.eval_dataset("test"))
    test_images, _, _ = generator.make_split("cifar10", "test")
    flat = data.global_contrast_normalize(
        test_images.reshape(len(test_images), -1) / 255.0)
    expected = (flat - cifar.mean) @ cifar.std.astype(np.float64)
    relative = (np.linalg.norm(out.reshape(len(out), -1) - expected) /
                np.linalg.norm(expected))
    self.assertLess(relative, 1e-4)

  def test_unknown_preprocess(self):
    with self.assertRaisesRegex(ValueError, "Unknown preprocess"):
      make_data(preprocess="whiten")


class AugmentationTest(tf.test.TestCase, parameterized.TestCase):

  def test_same_seed_same_batches_other_seed_other_batches(self):
    def batches(seed):
      cifar = make_data(augment="flip_crop_rotate", seed=seed)
      return take(cifar.train_dataset(), 15)  # 1.5 epochs.

    first, again, other = batches(1), batches(1), batches(2)
    self.assertAllEqual(first[0], again[0])
    self.assertAllEqual(first[1], again[1])
    self.assertNotAllClose(first[0], other[0])

  def test_first_batch_resumes_the_stream(self):
    cifar = make_data(augment="flip_crop_rotate", seed=4)
    BATCHES_PER_EPOCH = 200 // BATCH
    whole = take(cifar.train_dataset(), 2 * BATCHES_PER_EPOCH + 3)
    skip = BATCHES_PER_EPOCH + 2  # Resume inside the second epoch.
    resumed = take(cifar.train_dataset(first_batch=skip),
                   BATCHES_PER_EPOCH + 1)
    self.assertAllEqual(resumed[0], whole[0][skip * BATCH:])
    self.assertAllEqual(resumed[1], whole[1][skip * BATCH:])

  def test_recalibration_batches_are_unaugmented_training_images(self):
    cifar = make_data(augment="flip_crop_rotate", seed=4)
    images, labels = take(cifar.recalibration_dataset(epoch=0),
                          200 // BATCH)
    expected, expected_labels = take(make_data().train_dataset(),
                                     200 // BATCH)
    self.assertEqual(multiset(to_uint8(cifar, images), labels),
                     multiset(to_uint8(cifar, expected), expected_labels))
    again, _ = take(cifar.recalibration_dataset(epoch=0), 1)
    other, _ = take(cifar.recalibration_dataset(epoch=1), 1)
    self.assertAllEqual(again, images[:BATCH])
    self.assertNotAllClose(other, images[:BATCH])

  def test_augmented_recalibration_batches_draw_their_own_augmentations(self):
    cifar = make_data(augment="flip_crop", seed=4)
    batches = 200 // BATCH
    augmented, labels = take(cifar.recalibration_dataset(0, augment=True),
                             batches)
    plain, plain_labels = take(cifar.recalibration_dataset(0), batches)
    # The same images in the same order, nearly every one transformed.
    self.assertAllEqual(labels, plain_labels)
    changed = np.abs(augmented - plain).max(axis=(1, 2, 3)) > 1e-3
    self.assertGreater(changed.mean(), 0.9)
    # As training draws them (flip and crop of the same images), but not the
    # training stream's own draws.
    training, _ = take(cifar.train_dataset(), batches)
    self.assertNotAllClose(np.sort(augmented.ravel()),
                           np.sort(training.ravel()))
    again, _ = take(cifar.recalibration_dataset(0, augment=True), 1)
    self.assertAllEqual(again, augmented[:BATCH])
    other, _ = take(cifar.recalibration_dataset(1, augment=True), 1)
    self.assertNotAllClose(other, augmented[:BATCH])
    # Without augmentation in training there is none to match.
    unaugmented = make_data(augment="none", seed=4)
    self.assertAllEqual(
        take(unaugmented.recalibration_dataset(0, augment=True), 1)[0],
        take(unaugmented.recalibration_dataset(0), 1)[0])

  def test_each_epoch_draws_new_augmentations(self):
    cifar = make_data(augment="flip_crop_rotate", shuffle_buffer=1)
    images, _ = take(cifar.train_dataset(), 20)  # Two epochs, in order.
    changed = np.abs(images[:200] - images[200:]).max(axis=(1, 2, 3)) > 1e-3
    self.assertGreater(changed.mean(), 0.9)

  def test_identical_across_processes(self):
    code = ("import hashlib, sys\n"
            "from entropy_sgd.workloads import data\n"
            "cifar = data.CifarData(data.PipelineConfig(data_dir=sys.argv[1], "
            "batch_size=20, augment='flip_crop_rotate', seed=3))\n"
            "digest = hashlib.sha256()\n"
            "for batch in cifar.train_dataset().take(12).as_numpy_iterator():\n"
            "  digest.update(batch[0].tobytes() + batch[1].tobytes())\n"
            "print(digest.hexdigest())\n")
    data_dir = os.path.join(TESTDATA, "cifar10")
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(data.__file__))))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code, data_dir], env=env,
                            capture_output=True, text=True, check=True)
    digest = hashlib.sha256()
    cifar = make_data(augment="flip_crop_rotate", seed=3)
    for images, labels in cifar.train_dataset().take(12).as_numpy_iterator():
      digest.update(images.tobytes() + labels.tobytes())
    self.assertEqual(result.stdout.strip().splitlines()[-1],
                     digest.hexdigest())

  def test_without_augmentation_an_epoch_is_the_normalised_training_set(self):
    cifar = make_data()
    expected_images, expected_labels, _ = generator.make_split(
        "cifar10", "train")
    images, labels = take(cifar.train_dataset(), 20)  # Two epochs.
    for epoch in (slice(0, 200), slice(200, 400)):
      self.assertEqual(multiset(to_uint8(cifar, images[epoch]), labels[epoch]),
                       multiset(expected_images, expected_labels))
    # Reshuffled each epoch.
    self.assertNotAllEqual(labels[:200], labels[200:])

  @parameterized.parameters(("flip_rotate", 0.0), ("flip_crop", 10.0),
                            ("flip_crop_rotate", 0.0))
  def test_flips_and_crops_are_exact(self, augment, rotation_degrees):
    """Every image is its original, maybe mirrored, maybe shifted by <= 4."""
    cifar = make_data(augment=augment, rotation_degrees=rotation_degrees,
                      shuffle_buffer=1)  # In order: image i is example i.
    expected, _, _ = generator.make_split("cifar10", "train")
    images, _ = take(cifar.train_dataset(), 2)
    shifts = range(-4, 5) if "crop" in augment else [0]
    fill = normalised(cifar, np.zeros([1, 1, 1, 3], np.uint8))[0]
    found = set()
    for image, original in zip(images, normalised(cifar, expected[:40])):
      matches = []
      for flip in (False, True):
        source = original[:, ::-1] if flip else original
        padded = np.pad(source, [(4, 4), (4, 4), (0, 0)])
        padded[:4], padded[-4:], padded[:, :4], padded[:, -4:] = (fill,) * 4
        for dy in shifts:
          for dx in shifts:
            candidate = padded[4 + dy:36 + dy, 4 + dx:36 + dx]
            if np.allclose(image, candidate, atol=1e-5):
              matches.append((flip, dy, dx))
      self.assertNotEmpty(matches)
      found.update(matches)
    self.assertEqual({flip for flip, _, _ in found}, {False, True})
    if "crop" in augment:
      self.assertGreater(len({(dy, dx) for _, dy, dx in found}), 15)

  def test_rotation_turns_a_bar_about_the_centre(self):
    """A centred horizontal bar comes out at angles within +-degrees."""
    images = np.zeros([40, 32, 32, 3], np.uint8)
    images[:, 15:17, 8:24] = 255  # Symmetric under flips.
    data_dir = write_cifar10(self.create_tempdir().full_path, images,
                             np.zeros(40, np.uint8))
    cifar = data.CifarData(data.PipelineConfig(
        data_dir=data_dir, batch_size=BATCH, augment="flip_rotate",
        rotation_degrees=30.0))
    outputs, _ = take(cifar.train_dataset(), 4)
    weights = (outputs * cifar.std + cifar.mean).mean(axis=-1)
    rows, cols = np.mgrid[0:32, 0:32]
    angles = []
    for w in weights:
      w = w / w.sum()
      row, col = (w * rows).sum(), (w * cols).sum()
      self.assertAllClose([row, col], [15.5, 15.5], atol=0.05)
      cov_rr = (w * (rows - row)**2).sum()
      cov_cc = (w * (cols - col)**2).sum()
      cov_rc = (w * (rows - row) * (cols - col)).sum()
      angles.append(np.degrees(0.5 * np.arctan2(2 * cov_rc, cov_cc - cov_rr)))
    self.assertLess(np.max(np.abs(angles)), 31.0)
    self.assertGreater(np.max(angles), 10.0)
    self.assertLess(np.min(angles), -10.0)


class ShardingTest(tf.test.TestCase):

  def test_shards_cover_each_example_once_per_epoch(self):
    cifar = make_data()
    expected_images, expected_labels, _ = generator.make_split(
        "cifar10", "train")
    train, test = [], []
    for shard in range(2):
      context = tf.distribute.InputContext(
          num_input_pipelines=2, input_pipeline_id=shard,
          num_replicas_in_sync=2)
      # 100 examples per shard, 10 per replica batch: 10 batches an epoch.
      images, labels = take(cifar.train_dataset(context), 10)
      self.assertEqual(images.shape, (100, 32, 32, 3))
      train.append((to_uint8(cifar, images), labels))
      test.append(take(cifar.eval_dataset("test", context)))
    self.assertEqual(
        multiset(*map(np.concatenate, zip(*train))),
        multiset(expected_images, expected_labels))
    _, test_labels, _ = generator.make_split("cifar10", "test")
    self.assertCountEqual(np.concatenate([t[1] for t in test]), test_labels)

  def test_first_batch_counts_global_batches_per_pipeline(self):
    # 2 pipelines of 2 replicas each: per global batch of 20 a pipeline
    # feeds two per-replica batches of 5 (10 records of its shard).
    cifar = make_data(augment="flip_crop", seed=5)
    skip = 7  # Global batches, past the first epoch of a shard (100 / 10).
    for pipeline in range(2):
      context = tf.distribute.InputContext(
          num_input_pipelines=2, input_pipeline_id=pipeline,
          num_replicas_in_sync=4)
      whole = take(cifar.train_dataset(context), 2 * (skip + 3))
      resumed = take(cifar.train_dataset(context, first_batch=skip), 6)
      self.assertAllEqual(resumed[0], whole[0][skip * 10:])
      self.assertAllEqual(resumed[1], whole[1][skip * 10:])

  def test_padded_eval_has_full_batches_and_masks_the_padding(self):
    cifar = make_data(eval_batch_size=16)  # 50 test images: 4 global batches.
    _, expected_labels, _ = generator.make_split("cifar10", "test")
    for pipelines, replicas in ((1, 1), (1, 2), (2, 4)):
      labels, masks = [], []
      for pipeline in range(pipelines):
        context = tf.distribute.InputContext(
            num_input_pipelines=pipelines, input_pipeline_id=pipeline,
            num_replicas_in_sync=replicas)
        dataset = cifar.eval_dataset("test", context, pad=True)
        per_replica = 16 // replicas
        self.assertEqual([spec.shape.as_list()
                          for spec in dataset.element_spec],
                         [[per_replica, 32, 32, 3], [per_replica],
                          [per_replica]])
        batches = list(dataset.as_numpy_iterator())
        self.assertLen(batches, 4 * replicas // pipelines)
        labels += [b[1] for b in batches]
        masks += [b[2] for b in batches]
      labels, masks = np.concatenate(labels), np.concatenate(masks)
      self.assertEqual(masks.sum(), 50)
      self.assertCountEqual(labels[masks == 1], expected_labels)
      self.assertAllEqual(labels[masks == 0], np.zeros(64 - 50))

  def test_recalibration_is_sharded_per_pipeline(self):
    cifar = make_data()
    seen = []
    for pipeline in range(2):
      context = tf.distribute.InputContext(
          num_input_pipelines=2, input_pipeline_id=pipeline,
          num_replicas_in_sync=2)
      images, labels = take(cifar.recalibration_dataset(0, context), 10)
      self.assertEqual(labels.shape, (100,))  # Batches of 10: one shard.
      seen.append(multiset(to_uint8(cifar, images), labels))
    expected_images, expected_labels, _ = generator.make_split(
        "cifar10", "train")
    self.assertEqual(sorted(seen[0] + seen[1]),
                     multiset(expected_images, expected_labels))

  def test_strategies_get_per_replica_batches(self):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    self.assertLen(devices, 2, "setUpModule makes 2 logical CPUs")
    strategy = tf.distribute.MirroredStrategy(devices)
    cifar = make_data(augment="flip_crop")
    for distributed in (
        strategy.distribute_datasets_from_function(cifar.train_dataset),
        strategy.experimental_distribute_dataset(cifar.train_dataset())):
      images, labels = next(iter(distributed))
      for replica_labels in strategy.experimental_local_results(labels):
        self.assertEqual(replica_labels.shape, [BATCH // 2])


class BadInputTest(tf.test.TestCase):

  def copy(self, name):
    target = os.path.join(self.create_tempdir().full_path, name)
    shutil.copytree(os.path.join(TESTDATA, name), target)
    return target

  def test_missing_directory(self):
    missing = os.path.join(self.create_tempdir().full_path, "nope")
    with self.assertRaisesRegex(data.DataError,
                                "--data_dir=.*nope.*cifar-10-batches-bin"):
      make_data(data_dir=missing)

  def test_missing_files(self):
    with self.assertRaisesRegex(data.DataError,
                                "--data_dir.*missing.*data_batch_1"):
      make_data(data_dir=self.create_tempdir().full_path)

  def test_truncated_file(self):
    data_dir = self.copy("cifar10")
    path = os.path.join(data_dir, FOLDERS["cifar10"], "data_batch_3.bin")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 100)
    with self.assertRaisesRegex(data.DataError, "truncated.*data_batch_3"):
      make_data(data_dir=data_dir)

  def test_empty_file(self):
    data_dir = self.copy("cifar100")
    open(os.path.join(data_dir, FOLDERS["cifar100"], "test.bin"), "w").close()
    with self.assertRaisesRegex(data.DataError, "truncated.*test.bin: 0 bytes"):
      make_data("cifar100", data_dir=data_dir)

  def test_truncated_gzip(self):
    data_dir = self.copy("cifar10_gz")
    path = os.path.join(data_dir, FOLDERS["cifar10"], "test_batch.bin.gz")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    with self.assertRaisesRegex(data.DataError, "truncated.*test_batch"):
      make_data(data_dir=data_dir)

  def test_corrupt_gzip_content(self):
    data_dir = self.copy("cifar10_gz")
    path = os.path.join(data_dir, FOLDERS["cifar10"], "data_batch_2.bin.gz")
    with open(path, "r+b") as f:  # Garble the middle; the trailer stays.
      f.seek(os.path.getsize(path) // 2)
      f.write(b"\xff" * 64)
    with self.assertRaisesRegex(data.DataError,
                                "corrupt.*data_batch_2.*re-download"):
      make_data(data_dir=data_dir)

  def test_not_gzip(self):
    data_dir = self.copy("cifar10_gz")
    with open(os.path.join(data_dir, FOLDERS["cifar10"], "data_batch_1.bin.gz"),
              "wb") as f:
      f.write(b"plain bytes, not gzip")
    with self.assertRaisesRegex(data.DataError, "not a gzip file"):
      make_data(data_dir=data_dir)

  def test_label_out_of_range(self):
    for dataset, label_offset in (("cifar10", 0), ("cifar100", 1)):
      data_dir = self.copy(dataset + "_gz")
      name = "test_batch.bin.gz" if dataset == "cifar10" else "test.bin.gz"
      path = os.path.join(data_dir, FOLDERS[dataset], name)
      with gzip.open(path, "rb") as f:
        content = bytearray(f.read())
      record_bytes = 3073 if dataset == "cifar10" else 3074
      content[3 * record_bytes + label_offset] = data.num_classes(dataset)
      with gzip.open(path, "wb") as f:
        f.write(bytes(content))
      with self.assertRaisesRegex(data.DataError,
                                  "truncated.*record 3 has label"):
        make_data(dataset, data_dir=data_dir)

  def test_tfds_without_data_or_network(self):
    config = data.PipelineConfig(tfds_data_dir=self.create_tempdir().full_path,
                                 download=False)
    with self.assertRaisesRegex(data.DataError,
                                "tensorflow-datasets.*--data_dir=DIR") as cm:
      data.CifarData(config)
    self.assertNotIn("\n", str(cm.exception))

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "Unknown augment"):
      data.PipelineConfig(augment="mixup")
    with self.assertRaisesRegex(ValueError, "Unknown dataset"):
      data.PipelineConfig(dataset="svhn")


class MnistTest(tf.test.TestCase):

  def test_idx_files_plain_and_gzipped(self):
    images, _ = generator.make_mnist_split("train")
    for folder in ("mnist", "mnist_gz"):
      pipeline = data.ImageData(data.PipelineConfig(
          dataset="mnist", batch_size=20, augment="none",
          data_dir=os.path.join(TESTDATA, folder)))
      self.assertEqual((pipeline.num_examples("train"),
                        pipeline.num_examples("test")), (200, 50))
      self.assertAllClose(pipeline.mean, [images.mean() / 255.0], atol=1e-6)
      self.assertAllClose(pipeline.std, [images.std() / 255.0], atol=1e-6)
      first = next(iter(pipeline.eval_dataset("test")))
      test_images, test_labels = generator.make_mnist_split("test")
      self.assertEqual(first[0].shape, (20, 28, 28, 1))
      self.assertAllEqual(first[1], test_labels[:20])
      self.assertAllClose(
          first[0][..., 0] * pipeline.std + pipeline.mean,
          test_images[:20] / 255.0, atol=1e-5)
      batch_images, _ = next(iter(pipeline.train_dataset()))
      self.assertEqual(batch_images.shape, (20, 28, 28, 1))


class TfdsSourceTest(tf.test.TestCase):

  def test_mocked_tfds(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=40):
      cifar = data.CifarData(data.PipelineConfig(
          batch_size=10, validation_examples=10, download=False,
          tfds_data_dir=self.create_tempdir().full_path))
      self.assertEqual(cifar.num_examples("train"), 30)
      self.assertEqual(cifar.num_examples("validation"), 10)
      images, labels = next(iter(cifar.train_dataset()))
      self.assertEqual(images.shape, [10, 32, 32, 3])
      self.assertEqual(labels.dtype, tf.int32)
      self.assertLen(take(cifar.eval_dataset("validation"))[1], 10)


def closed_local_port():
  """A local TCP port nothing listens on (connections are refused)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_NO_PROXY_ENV = {k: "" for k in ("http_proxy", "https_proxy", "all_proxy",
                                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                 "no_proxy", "NO_PROXY")}


class OfflineTfdsTest(tf.test.TestCase):
  """Without a network the tfds source fails in seconds, not minutes.

  The download hosts are pointed at local ports, so nothing here depends on
  the machine's network.
  """

  def test_offline_start_fails_fast_with_one_line(self):
    hosts = {"cifar10": (("127.0.0.1", closed_local_port()),)}
    config = data.PipelineConfig(tfds_data_dir=self.create_tempdir().full_path)
    self.assertTrue(config.download)
    start = time.monotonic()
    with mock.patch.dict(data._TFDS_DOWNLOAD_HOSTS, hosts), \
        mock.patch.dict(os.environ, _NO_PROXY_ENV):
      with self.assertRaisesRegex(
          data.DataError, r"^No CIFAR-10 data: tensorflow-datasets could not "
          r"download or find it \(ConnectionError: no network: "
          r"127\.0\.0\.1:\d+ ConnectionRefusedError.*\)\. Pass "
          r"--data_dir=DIR where DIR holds cifar-10-batches-bin/") as cm:
        data.CifarData(config)
    self.assertLess(time.monotonic() - start, 15.0)
    self.assertNotIn("\n", str(cm.exception))

  def test_a_hanging_probe_gives_up_after_its_timeout(self):
    def hang(*args, **kwargs):
      del args, kwargs
      time.sleep(30)

    start = time.monotonic()
    with mock.patch.object(socket, "create_connection", hang):
      problem = data._unreachable_download_hosts(
          [("download.invalid", 443), ("mirror.invalid", 443)], timeout=0.5)
    self.assertLess(time.monotonic() - start, 3.0)
    self.assertIn("no answer within 0.5 s", problem)

  def test_one_reachable_host_is_enough(self):
    with socket.socket() as server, \
        mock.patch.dict(os.environ, _NO_PROXY_ENV):
      server.bind(("127.0.0.1", 0))
      server.listen(1)
      port = server.getsockname()[1]
      self.assertIsNone(data._unreachable_download_hosts(
          [("127.0.0.1", closed_local_port()), ("127.0.0.1", port)],
          timeout=2.0))
      self.assertIsNotNone(data._unreachable_download_hosts(
          [("127.0.0.1", closed_local_port())], timeout=2.0))

  def test_probes_the_proxy(self):
    env = dict(_NO_PROXY_ENV, https_proxy="http://proxy.example:3128")
    with mock.patch.dict(os.environ, env):
      self.assertEqual(data._via_proxy("www.cs.toronto.edu", 443),
                       ("proxy.example", 3128))
    env["no_proxy"] = "www.cs.toronto.edu"
    with mock.patch.dict(os.environ, env):
      self.assertEqual(data._via_proxy("www.cs.toronto.edu", 443),
                       ("www.cs.toronto.edu", 443))

  def test_prepared_data_need_no_probe(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    probe = mock.Mock(side_effect=AssertionError("probed"))
    with tfds.testing.mock_data(num_examples=20), \
        mock.patch.object(data, "_unreachable_download_hosts", probe), \
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared",
                          return_value=True):
      cifar = data.CifarData(data.PipelineConfig(
          batch_size=10, tfds_data_dir=self.create_tempdir().full_path))
    self.assertEqual(cifar.num_examples("train"), 20)
    probe.assert_not_called()

  def test_reachable_hosts_let_tfds_download(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=20), \
        mock.patch.object(data, "_unreachable_download_hosts",
                          return_value=None) as probe:
      cifar = data.CifarData(data.PipelineConfig(
          dataset="cifar100", batch_size=10,
          tfds_data_dir=self.create_tempdir().full_path))
    self.assertEqual(cifar.num_examples("train"), 20)
    probe.assert_called_once_with(data._TFDS_DOWNLOAD_HOSTS["cifar100"])


class RealCifar10Test(tf.test.TestCase):
  """Known CIFAR-10 statistics; needs $ENTROPY_SGD_CIFAR10_DIR."""

  def test_known_statistics(self):
    data_dir = os.environ.get("ENTROPY_SGD_CIFAR10_DIR")
    if not data_dir:
      self.skipTest("ENTROPY_SGD_CIFAR10_DIR is not set")
    cifar = data.CifarData(data.PipelineConfig(data_dir=data_dir))
    self.assertAllClose(cifar.mean, [0.49139968, 0.48215841, 0.44653091],
                        atol=1e-6)
    self.assertAllClose(cifar.std, [0.24703223, 0.24348513, 0.26158784],
                        atol=1e-6)


def setUpModule():
  distribution.logical_cpus(2)  # The strategy test; before TF starts up.


if __name__ == "__main__":
  tf.test.main()
