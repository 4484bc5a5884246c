#!/usr/bin/env python3
"""Tests of mkinitramfs.py: run with `python3 guest-kernel-config/test_mkinitramfs.py`.

They check the archive against GNU cpio's own reading of it (when `cpio` is installed), that
two runs give the same bytes, and that bad entry lists are rejected with a message.
"""

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree

import mkinitramfs  # noqa: E402


class MkInitramfsTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="mkinitramfs-test.")
        self.payload = os.path.join(self.dir, "payload")
        with open(self.payload, "wb") as f:
            f.write(b"#!/bin/sh\necho hi\n")

    def tearDown(self):
        shutil.rmtree(self.dir)

    def build(self, name, *args):
        out = os.path.join(self.dir, name)
        rc = mkinitramfs.main(["-o", out, *args])
        self.assertEqual(rc, 0)
        with open(out, "rb") as f:
            return f.read()

    def spec(self):
        # Deliberately unsorted: the tool sorts.
        return [
            "--file", f"/init:0755:{self.payload}",
            "--nod", "/dev/console:0600:c:5:1",
            "--dir", "/dev:0755",
            "--symlink", "/bin/sh:busybox",
            "--dir", "/bin:0755",
            "--dir", "/tmp:1777",
        ]

    def test_same_inputs_same_bytes(self):
        first = self.build("a.cpio.gz", *self.spec())
        os.utime(self.payload, (1, 1))  # a different mtime of the source must not matter
        second = self.build("b.cpio.gz", *self.spec())
        self.assertEqual(first, second)
        # gzip header: no file name flag, mtime 0.
        self.assertEqual(first[3] & 0x08, 0)
        self.assertEqual(first[4:8], b"\0\0\0\0")

    @unittest.skipUnless(shutil.which("cpio"), "GNU cpio not installed")
    def test_gnu_cpio_reads_the_archive(self):
        data = gzip.decompress(self.build("a.cpio.gz", *self.spec()))
        listing = subprocess.run(
            ["cpio", "-itv", "--quiet"], input=data, capture_output=True, check=True
        ).stdout.decode()
        lines = listing.splitlines()
        names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines]
        self.assertEqual(names, ["bin", "bin/sh", "dev", "dev/console", "init", "tmp"])
        self.assertTrue(lines[0].startswith("drwxr-xr-x"), lines[0])
        self.assertTrue(lines[1].startswith("lrwxrwxrwx") and lines[1].endswith("bin/sh -> busybox"), lines[1])
        self.assertTrue(lines[3].startswith("crw-------") and "5,   1" in lines[3], lines[3])
        self.assertTrue(lines[4].startswith("-rwxr-xr-x"), lines[4])
        self.assertTrue(lines[5].startswith("drwxrwxrwt"), lines[5])
        for line in lines:
            self.assertIn(" root     root ", line)
        extract = os.path.join(self.dir, "x")
        os.mkdir(extract)
        subprocess.run(["cpio", "-id", "--quiet", "init"], input=data, cwd=extract, check=True)
        with open(os.path.join(extract, "init"), "rb") as f:
            self.assertEqual(f.read(), b"#!/bin/sh\necho hi\n")

    def test_plain_cpio_is_the_gzip_archive_uncompressed(self):
        plain = self.build("a.cpio", *self.spec())
        packed = self.build("a.cpio.gz", *self.spec())
        self.assertEqual(plain[:6], b"070701")  # newc magic, no gzip header
        self.assertEqual(plain, gzip.decompress(packed))

    def test_rejects_unknown_output_names(self):
        out = os.path.join(self.dir, "initramfs.img")
        self.assertEqual(mkinitramfs.main(["-o", out, "--dir", "/a:0755"]), 2)
        self.assertFalse(os.path.exists(out))

    def test_rejects_bad_entries(self):
        cases = [
            ["--file", f"/a/b:0755:{self.payload}"],  # parent missing
            ["--file", f"/a:0755:{self.dir}/missing"],  # unreadable source
            ["--dir", "/a:0999"],  # not octal
            ["--dir", "relative:0755"],
            ["--dir", "/a/../b:0755"],
            ["--nod", "/null:0666:x:1:3"],
            ["--dir", "/a:0755", "--dir", "/a:0755"],  # duplicate
        ]
        for args in cases:
            with self.subTest(args=args):
                out = os.path.join(self.dir, "bad.cpio.gz")
                self.assertEqual(mkinitramfs.main(["-o", out, *args]), 2)
                self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
