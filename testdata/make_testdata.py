"""Writes tiny CIFAR-10/100 and MNIST files in the original layouts.

Run `python testdata/make_testdata.py` (or `bazel run //testdata:make_testdata`)
to regenerate byte-identical files next to this script:

  cifar10/cifar-10-batches-bin/{data_batch_1..5.bin, test_batch.bin,
                                batches.meta.txt}
  cifar10_gz/cifar-10-batches-bin/  the same, .bin files gzipped
  cifar100/cifar-100-binary/{train.bin, test.bin, fine_label_names.txt,
                             coarse_label_names.txt}
  cifar100_gz/cifar-100-binary/     the same, .bin files gzipped
  mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte   IDX files
  mnist_gz/                         the same, gzipped (.gz)

MNIST images are learnable too: a bright bar whose row and angle encode the
digit, on dark noise. CIFAR images are learnable: a disc whose colour (fine label % 10) and position
(fine label // 10) encode the class, on a blocky random background with sparse
pixel noise. Tests call `make_split` to rebuild the expected arrays.
"""

import gzip
import os

import numpy as np

CIFAR10_TRAIN_PER_BATCH = 40  # x 5 batch files = 200 training images.
CIFAR100_TRAIN = 150
NUM_TEST = 50
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                 "frog", "horse", "ship", "truck")
# RGB blob colours, indexed by label % 10.
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
     [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
     [250, 250, 250], [10, 10, 10]], dtype=np.float64)
# Disc centres (row, col), indexed by label // 10: always the centre for CIFAR-10.
_POSITIONS = np.array(
    [[16, 16], [6, 6], [6, 16], [6, 26], [16, 6], [16, 26], [26, 6],
     [26, 16], [26, 26], [11, 21]], dtype=np.float64)
_SEEDS = {("cifar10", "train"): 10, ("cifar10", "test"): 11,
          ("cifar100", "train"): 100, ("cifar100", "test"): 101,
          ("mnist", "train"): 7, ("mnist", "test"): 8}
MNIST_TRAIN = 200
MNIST_IMAGES_MAGIC, MNIST_LABELS_MAGIC = 2051, 2049


def _image(rng, label):
  """One [32, 32, 3] uint8 image for `label`."""
  # Background: 4x4 random colours, upsampled to 32x32.
  background = np.kron(rng.uniform(60, 190, size=(4, 4, 3)),
                       np.ones((8, 8, 1)))
  centre = _POSITIONS[label // 10] + rng.uniform(-2, 2, size=2)
  rows, cols = np.mgrid[0:32, 0:32]
  inside = (rows - centre[0])**2 + (cols - centre[1])**2 < 25.0
  image = np.where(inside[..., None], _PALETTE[label % 10], background)
  # Sparse pixel noise (dense noise would make the .gz copies large).
  image += rng.randint(-20, 21, size=image.shape) * (
      rng.uniform(size=image.shape) < 0.03)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_split(dataset, split):
  """Returns (images uint8 [N,32,32,3], fine labels, coarse labels) in order.

  Coarse labels are fine // 5 (CIFAR-100 style); CIFAR-10 ignores them.
  """
  rng = np.random.RandomState(_SEEDS[(dataset, split)])
  num_classes = 10 if dataset == "cifar10" else 100
  if split == "test":
    count = NUM_TEST
  else:
    count = 5 * CIFAR10_TRAIN_PER_BATCH if dataset == "cifar10" else (
        CIFAR100_TRAIN)
  labels = rng.randint(0, num_classes, size=count).astype(np.uint8)
  images = np.stack([_image(rng, int(label)) for label in labels])
  return images, labels, (labels // 5).astype(np.uint8)


def make_mnist_split(split):
  """Returns (images uint8 [N, 28, 28], labels uint8 [N]) in order."""
  rng = np.random.RandomState(_SEEDS[("mnist", split)])
  count = MNIST_TRAIN if split == "train" else NUM_TEST
  labels = rng.randint(0, 10, size=count).astype(np.uint8)
  rows, cols = np.mgrid[0:28, 0:28]
  images = []
  for label in labels:
    centre_row = 4 + 2 * (label % 5) * 2.5 + rng.uniform(-1, 1)
    slope = 0.6 if label >= 5 else 0.0
    distance = np.abs(rows - centre_row - slope * (cols - 14))
    image = 230.0 * (distance < 1.5) + rng.uniform(0, 40, size=(28, 28))
    images.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
  return np.stack(images), labels


def idx_bytes(array, magic):
  """An IDX file: big-endian magic, dimensions, then the uint8 values."""
  header = np.array([magic, *array.shape], ">u4").tobytes()
  return header + np.asarray(array, np.uint8).tobytes()


def to_records(images, *label_columns):
  """Binary records: label bytes, then the R, G and B planes (row-major)."""
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  columns = [np.asarray(c, np.uint8)[:, None] for c in label_columns]
  return np.concatenate(columns + [planes], axis=1).tobytes()


def _write(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)


def _write_both(root, folder, name, content):
  """Writes root/<ds>/folder/name and, for .bin files, a gzipped copy."""
  dataset = "cifar10" if folder.startswith("cifar-10-") else "cifar100"
  _write(os.path.join(root, dataset, folder, name), content)
  if name.endswith(".bin"):
    name, content = name + ".gz", gzip.compress(content, 9, mtime=0)
  _write(os.path.join(root, dataset + "_gz", folder, name), content)


def write_all(root):
  """Writes every file under `root`."""
  folder = "cifar-10-batches-bin"
  images, labels, _ = make_split("cifar10", "train")
  for i in range(5):
    part = slice(i * CIFAR10_TRAIN_PER_BATCH, (i + 1) * CIFAR10_TRAIN_PER_BATCH)
    _write_both(root, folder, f"data_batch_{i + 1}.bin",
                to_records(images[part], labels[part]))
  images, labels, _ = make_split("cifar10", "test")
  _write_both(root, folder, "test_batch.bin", to_records(images, labels))
  _write_both(root, folder, "batches.meta.txt",
              ("\n".join(CIFAR10_NAMES) + "\n\n").encode())

  folder = "cifar-100-binary"
  for split, name in (("train", "train.bin"), ("test", "test.bin")):
    images, fine, coarse = make_split("cifar100", split)
    _write_both(root, folder, name, to_records(images, coarse, fine))
  _write_both(root, folder, "fine_label_names.txt",
              "".join(f"class_{i}\n" for i in range(100)).encode())
  _write_both(root, folder, "coarse_label_names.txt",
              "".join(f"superclass_{i}\n" for i in range(20)).encode())

  for split, prefix in (("train", "train"), ("test", "t10k")):
    images, labels = make_mnist_split(split)
    for name, content in (
        (f"{prefix}-images-idx3-ubyte", idx_bytes(images, MNIST_IMAGES_MAGIC)),
        (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, MNIST_LABELS_MAGIC))):
      _write(os.path.join(root, "mnist", name), content)
      _write(os.path.join(root, "mnist_gz", name + ".gz"),
             gzip.compress(content, 9, mtime=0))


if __name__ == "__main__":
  # Under `bazel run`, write into the source tree, not the runfiles.
  workspace = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
  write_all(os.path.join(workspace, "testdata") if workspace
            else os.path.dirname(os.path.abspath(__file__)))
