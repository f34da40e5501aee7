"""Image datasets kept as uint8, normalised per batch, and the CIFAR training augmentation done in batches.

`ImageTensors` holds images as uint8 [N, C, H, W] (a quarter of the memory of normalised float32)
with their labels and normalisation. Read one sample at a time (a DataLoader, evaluation code that
indexes it) it returns exactly what torchvision's `ToTensor` + `Normalize` return; the resident
training path (`training.batches`) instead keeps the uint8 tensors on the training device and
normalises each batch there.

`Augment` is the usual CIFAR recipe: zero padding, a random crop back to the original size and a
random horizontal flip, drawn per sample. The draws of an epoch come from a generator seeded by the
member's seed and the epoch (`training.batches.augment_draws`), so they are the same on every
device, every rank layout and after a resume; `augment_batch` applies them to a whole batch at once.
Cropping and flipping commute with the per-channel normalisation, so augmenting uint8 images before
normalising (padding with 0) equals augmenting normalised images (padding with the normalised 0).

`ImageFiles` is an image folder tree (`data.name=imagefolder`) read one file at a time, as torchvision's
`ImageFolder` reads it, but listed by `list_image_files`: every file is checked before anything trains
(not empty; a PNG's signature and end, a JPEG's start), folder links back into the tree are refused
rather than followed round in a loop, and a file that fails to decode later names itself.
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ntdist.errors import UserError


@dataclass(frozen=True)
class Augment:
    """Random crop after `padding` pixels of zero padding on each side, and a random horizontal flip."""

    padding: int = 0
    flip: bool = False

    def __bool__(self) -> bool:
        return self.padding > 0 or self.flip

    def draw(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """[n, 3] int64 on the CPU: per sample the crop's top and left offset (0..2*padding) and 1 to flip.

        All three columns are always drawn, so the stream of draws does not depend on the recipe."""
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator)
        return torch.cat([offsets, flips if self.flip else torch.zeros_like(flips)], dim=1)


def augment_batch(x: torch.Tensor, draws: torch.Tensor, padding: int, fill) -> torch.Tensor:
    """Crop and flip every image of `x` [B, C, H, W] as `draws` [B, 3] (from `Augment.draw`) say.

    `fill` is the value of the padding: a number, or one value per channel as a [1, C, 1, 1] tensor.
    """
    draws = draws.to(x.device)
    batch, channels, height, width = x.shape
    if padding > 0:
        padded = x.new_empty(batch, channels, height + 2 * padding, width + 2 * padding)
        padded[:] = fill
        padded[:, :, padding:padding + height, padding:padding + width] = x
        rows = draws[:, 0, None] + torch.arange(height, device=x.device)            # [B, H]
        cols = draws[:, 1, None] + torch.arange(width, device=x.device)             # [B, W]
        x = padded[torch.arange(batch, device=x.device)[:, None, None, None],
                   torch.arange(channels, device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    flip = draws[:, 2].bool().view(batch, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


class ImageTensors(Dataset):
    """uint8 images [N, C, H, W] with labels [N], normalised by per-channel `mean` and `std` (of x / 255).

    `augment` is the training augmentation the batches apply (`training.batches`); reading a single
    sample never augments it. `without_augment()` is the same data for evaluation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Augment = Augment()):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UserError(f"ImageTensors needs uint8 images [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(labels) != len(images) or len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise UserError(f"ImageTensors: {len(images)} images of {images.shape[1]} channels need as many "
                             f"labels and one mean and std per channel; got {len(labels)} labels, "
                             f"{len(mean)} means, {len(std)} stds")
        self.images, self.labels, self.augment = images, labels.long(), augment
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._stats: Dict[torch.device, tuple] = {}   # device -> (mean, std) as [1, C, 1, 1] tensors there

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.normalise(self.images[index][None])[0], self.labels[index]

    def without_augment(self) -> "ImageTensors":
        """The same tensors without training augmentation (validation and test views)."""
        return ImageTensors(self.images, self.labels, self.mean, self.std)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (x / 255 - mean) / std of a uint8 batch [B, C, H, W], on the batch's device.

        The same operations in the same order as torchvision's `ToTensor` and `Normalize`, so the
        values are bit-identical to theirs."""
        if x.device not in self._stats:
            shape = (1, len(self.mean), 1, 1)
            self._stats[x.device] = (torch.tensor(self.mean, device=x.device).view(shape),
                                     torch.tensor(self.std, device=x.device).view(shape))
        mean, std = self._stats[x.device]
        return x.float().div(255).sub(mean).div(std)

    def fill(self, device) -> torch.Tensor:
        """The normalised value of a zero pixel, per channel [1, C, 1, 1]: the padding of normalised images."""
        return self.normalise(torch.zeros(1, len(self.mean), 1, 1, dtype=torch.uint8, device=device))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"   # a PNG file's first bytes
PNG_END = b"IEND\xaeB`\x82"             # the type and CRC of its last chunk
JPEG_START = b"\xff\xd8\xff"


class UnreadableImage(UserError):
    """An image file that cannot be decoded, named in one line.

    A DataLoader worker re-raises it in the main process as `UnreadableImage(message)` with the worker's
    traceback around the message: the message is then the last line of that text."""

    def __init__(self, message: str):
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def read_image(path: str):
    """The image at `path` as an RGB PIL image (torchvision's `pil_loader`); `UnreadableImage` names the file."""
    try:
        return _open_rgb(path)
    except (OSError, SyntaxError, ValueError) as err:   # PIL reports broken files as any of these
        raise UnreadableImage(f"image '{path}' cannot be decoded ({_reason(err)}); delete or replace it") from None


def check_image_file(path: str) -> None:
    """Refuse an empty file, and a PNG or JPEG that does not start (or a PNG that does not end) as one
    does and also fails to decode; reads a few bytes of each file, decodes only the suspicious ones."""
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"image '{path}' is empty (0 bytes); delete it or copy the image again")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".jpg", ".jpeg"):
        return
    with open(path, "rb") as f:
        head = f.read(8)
        if ext == ".png":
            f.seek(max(0, size - 64))
            problem = "does not start as a PNG does" if head != PNG_SIGNATURE else \
                None if PNG_END in f.read() else "ends before the last chunk of a PNG (cut short?)"
        else:
            problem = None if head.startswith(JPEG_START) else "does not start as a JPEG does"
    if problem is None:
        return
    try:
        _open_rgb(path)   # another format under the name, or a missing end PIL does without: fine
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"image '{path}' {problem} and cannot be decoded ({_reason(err)}); delete or "
                              "replace it") from None


def _open_rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _reason(err: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):   # its message is the file object's repr
        return "no image format PIL knows"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def list_image_files(folder: str, extensions: Tuple[str, ...], tree: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(classes, samples) of `folder`/<class>/**/<file> as torchvision's `ImageFolder` lists them (sorted; only
    files with one of `extensions`), every file checked by `check_image_file`. Folder links are followed,
    except into `tree` (the whole data root) or onto a folder already read: those would read images again,
    round a loop or under a second class, and are refused."""
    with os.scandir(folder) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir())
    if not classes:
        raise UserError(f"'{folder}' has no class folders; put the images of each class in a folder of its own")
    root, seen, samples = os.path.realpath(tree), set(), []
    for label, name in enumerate(classes):
        _refuse_link_into(os.path.join(folder, name), root)
        found = []   # (folder, its image files), in torchvision's order: by folder, then by name
        for dirpath, dirnames, filenames in os.walk(os.path.join(folder, name), followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                raise UserError(f"imagefolder: '{dirpath}' is the folder '{real}' a second time (through a link); "
                                "ntdist reads each folder once: remove the link that leads there again")
            seen.add(real)
            for sub in dirnames:
                _refuse_link_into(os.path.join(dirpath, sub), root)
            found.append((dirpath, sorted(f for f in filenames if f.lower().endswith(extensions))))
        paths = [os.path.join(dirpath, f) for dirpath, files in sorted(found) for f in files]
        if not paths:
            raise UserError(f"'{os.path.join(folder, name)}' has no images (files ending in {', '.join(extensions)})"
                            "; every class folder needs some")
        samples += [(path, label) for path in paths]
    for path, _ in samples:
        check_image_file(path)
    return classes, samples


def _refuse_link_into(path: str, root: str) -> None:
    if not os.path.islink(path):
        return
    target = os.path.realpath(path)
    if _within(target, root) or _within(root, target):
        raise UserError(f"imagefolder: the folder link '{path}' leads back into the data tree ('{target}'), so its "
                        "images would be read again (round a loop, or under another class); ntdist does not follow "
                        "such links: remove it, or replace it with a copy of the folder")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class ImageFiles(Dataset):
    """Samples (path, label) of an image folder, each read by `read_image` and `transform`ed: (tensor, label)."""

    def __init__(self, classes: List[str], samples: List[Tuple[str, int]], transform: Callable,
                 varies_per_read: bool = False):
        self.classes, self.samples, self.transform = classes, samples, transform
        self.varies_per_read = varies_per_read   # random transforms: never decoded once and kept (training.batches)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(read_image(path)), label
