#!/usr/bin/env python3
"""Write a reproducible initramfs (cpio "newc", plain or gzip) from an explicit entry list.

Nothing is taken from the file system except the contents of the files named with --file, so
the same inputs always give the same bytes: entries sorted by path, owner 0:0, a fixed mtime
(SOURCE_DATE_EPOCH, default 0), inode numbers assigned in order, and (for .cpio.gz) a gzip
header without name or timestamp (like `gzip -n`). No root privileges are needed: device nodes
are written as archive entries, never created with mknod.

The output name picks the format: `NAME.cpio` is written uncompressed (what moat ships: the
guest kernel then copies the files out instead of inflating them, measured faster to boot,
docs/benchmarks.md), `NAME.cpio.gz` gzip-compressed.

Entry syntax (paths are absolute inside the image, modes octal):
  --dir     PATH:MODE
  --file    PATH:MODE:SOURCE
  --symlink PATH:TARGET
  --nod     PATH:MODE:c|b:MAJOR:MINOR

Example:
  mkinitramfs.py -o initramfs.cpio --dir /dev:0755 --nod /dev/console:0600:c:5:1 \\
      --file /init:0755:target/release/moat-agent
"""

import argparse
import gzip
import os
import stat
import sys
from dataclasses import dataclass
from typing import List


class SpecError(Exception):
    """An entry argument that cannot be turned into an archive entry."""


@dataclass(frozen=True)
class Entry:
    path: str  # inside the image, without the leading "/"
    mode: int  # full st_mode: type bits | permission bits
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _image_path(raw: str) -> str:
    if not raw.startswith("/"):
        raise SpecError(f"image path '{raw}' must be absolute")
    parts = [p for p in raw.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise SpecError(f"image path '{raw}' must name an entry below / without '.' or '..'")
    return "/".join(parts)


def _perm(raw: str, what: str) -> int:
    try:
        value = int(raw, 8)
    except ValueError:
        raise SpecError(f"{what}: mode '{raw}' is not an octal number") from None
    if value & ~0o7777:
        raise SpecError(f"{what}: mode '{raw}' has bits outside 07777")
    return value


def parse_dir(spec: str) -> Entry:
    fields = spec.split(":")
    if len(fields) != 2:
        raise SpecError(f"--dir '{spec}': expected PATH:MODE")
    return Entry(_image_path(fields[0]), stat.S_IFDIR | _perm(fields[1], f"--dir '{spec}'"))


def parse_file(spec: str) -> Entry:
    fields = spec.split(":", 2)
    if len(fields) != 3:
        raise SpecError(f"--file '{spec}': expected PATH:MODE:SOURCE")
    try:
        with open(fields[2], "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpecError(f"--file '{spec}': cannot read {fields[2]}: {e.strerror}") from None
    return Entry(_image_path(fields[0]), stat.S_IFREG | _perm(fields[1], f"--file '{spec}'"), data)


def parse_symlink(spec: str) -> Entry:
    fields = spec.split(":", 1)
    if len(fields) != 2 or not fields[1]:
        raise SpecError(f"--symlink '{spec}': expected PATH:TARGET")
    return Entry(_image_path(fields[0]), stat.S_IFLNK | 0o777, fields[1].encode())


def parse_nod(spec: str) -> Entry:
    fields = spec.split(":")
    if len(fields) != 5 or fields[2] not in ("c", "b"):
        raise SpecError(f"--nod '{spec}': expected PATH:MODE:c|b:MAJOR:MINOR")
    try:
        major, minor = int(fields[3]), int(fields[4])
    except ValueError:
        raise SpecError(f"--nod '{spec}': MAJOR and MINOR must be integers") from None
    kind = stat.S_IFCHR if fields[2] == "c" else stat.S_IFBLK
    mode = kind | _perm(fields[1], f"--nod '{spec}'")
    return Entry(_image_path(fields[0]), mode, rdev_major=major, rdev_minor=minor)


def check_tree(entries: List[Entry]) -> List[Entry]:
    """Sort entries parents-first and reject duplicates and entries without a parent directory."""
    ordered = sorted(entries, key=lambda e: e.path.split("/"))
    dirs = set()
    seen = set()
    for e in ordered:
        if e.path in seen:
            raise SpecError(f"/{e.path} is given more than once")
        seen.add(e.path)
        parent = e.path.rpartition("/")[0]
        if parent and parent not in dirs:
            raise SpecError(f"/{e.path}: parent directory /{parent} is not in the image (add --dir)")
        if stat.S_ISDIR(e.mode):
            dirs.add(e.path)
    return ordered


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, major: int, minor: int, namesize: int) -> bytes:
    fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, major, minor, namesize, 0]
    return b"070701" + b"".join(b"%08X" % v for v in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def cpio_newc(entries: List[Entry], mtime: int) -> bytes:
    out = bytearray()
    for ino, e in enumerate(entries, start=1):
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        head = _header(ino, e.mode, nlink, mtime, len(e.data), e.rdev_major, e.rdev_minor, len(name))
        out += head + name + _pad4(len(head) + len(name))
        out += e.data + _pad4(len(e.data))
    trailer = b"TRAILER!!!\0"
    head = _header(0, 0, 1, 0, 0, 0, 0, len(trailer))
    out += head + trailer + _pad4(len(head) + len(trailer))
    return bytes(out)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("-o", "--output", required=True, help="the .cpio (plain) or .cpio.gz (gzip) to write")
    parser.add_argument("--dir", action="append", default=[], type=str)
    parser.add_argument("--file", action="append", default=[], type=str)
    parser.add_argument("--symlink", action="append", default=[], type=str)
    parser.add_argument("--nod", action="append", default=[], type=str)
    args = parser.parse_args(argv)

    try:
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        if not 0 <= mtime <= 0xFFFFFFFF:
            raise ValueError
    except ValueError:
        print("mkinitramfs: SOURCE_DATE_EPOCH must be an integer in 0..2^32-1", file=sys.stderr)
        return 2

    if args.output.endswith(".cpio.gz"):
        compress = True
    elif args.output.endswith(".cpio"):
        compress = False
    else:
        print(f"mkinitramfs: {args.output}: the name must end in .cpio (plain) or .cpio.gz (gzip)", file=sys.stderr)
        return 2

    try:
        entries = [parse_dir(s) for s in args.dir]
        entries += [parse_file(s) for s in args.file]
        entries += [parse_symlink(s) for s in args.symlink]
        entries += [parse_nod(s) for s in args.nod]
        archive = cpio_newc(check_tree(entries), mtime)
    except SpecError as e:
        print(f"mkinitramfs: {e}", file=sys.stderr)
        return 2

    tmp = f"{args.output}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as raw:
            if compress:
                # filename="" and mtime=0 keep the gzip header free of varying data (gzip -n).
                with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
                    gz.write(archive)
            else:
                raw.write(archive)
        os.replace(tmp, args.output)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        print(f"mkinitramfs: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
