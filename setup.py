"""Build the optional batch codec extension (everything else is in pyproject.toml).

``obd.formats._zbatch`` checks and decodes whole runs of ZFile blocks in C with the GIL
released, calling the system liblz4 / libzstd (Debian: gcc, liblz4-dev, libzstd-dev). It
is optional: without a compiler or the headers the install goes on and
``obd.formats.codecs`` uses its ctypes / pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "obd.formats._zbatch",
            sources=["obd/formats/_zbatch.c"],
            libraries=["lz4", "zstd"],
            extra_compile_args=["-O2", "-std=gnu11"],
            optional=True,
        )
    ]
)
