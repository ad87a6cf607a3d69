"""Packaging glue that pyproject.toml cannot say: the browser page (`client/`, a folder of the
checkout beside `server/`) goes into the wheel as `server/client/`, where the installed server
looks for it (server/static.py). Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CLIENT = Path(__file__).resolve().parent / "client"


class BuildWithClient(build_py):
    def run(self) -> None:
        super().run()
        if not (CLIENT / "index.html").is_file():
            raise SystemExit(f"cannot package the browser page: {CLIENT}/index.html is missing")
        target = Path(self.build_lib) / "server" / "client"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CLIENT, target, ignore=shutil.ignore_patterns(".*"))


setup(cmdclass={"build_py": BuildWithClient})
