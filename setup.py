"""Maps the folders `plugins/` and `bridges/` to the import packages `sdcore_plugins` and `sdcore_bridges`.

The folders keep short names for people browsing the repository; the import names are unique so they never
clash with another distribution's top-level `plugins` package. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {"sdcore": "sdcore", "sdcore_plugins": "plugins", "sdcore_bridges": "bridges"}


def packages() -> list[str]:
    found = []
    for name, folder in PACKAGE_DIRS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=packages(), package_dir=PACKAGE_DIRS)
