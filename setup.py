"""Maps the two import roots onto their folders (see DESIGN.md §4).

`operator` is a standard-library module name, so the folder `operator/` is
installed as `kvfleet.operator` and `dataplane/` as `kvfleet.dataplane`.
Sub-packages are discovered, so a new folder with an `__init__.py` ships
without touching this file.
"""

from setuptools import find_packages, setup

ROOTS = {"kvfleet": "kvfleet", "kvfleet.operator": "operator", "kvfleet.dataplane": "dataplane"}

packages = []
for name, path in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(path)]

# the CPU kernels' source is compiled at run time (dataplane/kernels/cpu.py), so it ships with the package
setup(packages=packages, package_dir=ROOTS, package_data={"kvfleet.dataplane.kernels": ["*.cpp", "*.h"]})
