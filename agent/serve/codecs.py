"""A pydicom pixel decoder plugin on imagecodecs, for the lossless syntaxes an archive may hold.

pydicom 3 decodes JPEG, JPEG-LS and JPEG 2000 through pylibjpeg, pyjpegls or GDCM; Dirigo
depends on imagecodecs (already used to encode) instead, so this plugin lets pydicom decode with
it (RLE pydicom decodes itself, with numpy). It is added after pydicom's own plugins: whatever
else is installed is tried first. Only lossless syntaxes are registered: Dirigo never decompresses
a lossy copy.
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom import uid
from pydicom.pixels.common import PhotometricInterpretation
from pydicom.pixels.decoders import base

LABEL = "dirigo-imagecodecs"
DECODER_DEPENDENCIES = {
    syntax: ("imagecodecs", "numpy")
    for syntax in (
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
    )
}
_DECODERS = {
    uid.JPEGLossless: base.JPEGLosslessDecoder,
    uid.JPEGLosslessSV1: base.JPEGLosslessSV1Decoder,
    uid.JPEGLSLossless: base.JPEGLSLosslessDecoder,
    uid.JPEG2000Lossless: base.JPEG2000LosslessDecoder,
    uid.HTJ2KLossless: base.HTJ2KLosslessDecoder,
    uid.HTJ2KLosslessRPCL: base.HTJ2KLosslessRPCLDecoder,
}
_JPEG_2000 = frozenset({uid.JPEG2000Lossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL})
_lock = threading.Lock()
_registered = False


def register() -> None:
    """Add this plugin to pydicom's decoders of the syntaxes above, once per process."""
    global _registered
    with _lock:
        if _registered:
            return
        for decoder in _DECODERS.values():
            if LABEL not in decoder.available_plugins:
                decoder.add_plugin(LABEL, (__name__, "decode_frame"))
        _registered = True


def is_available(syntax: str) -> bool:
    """Return True if this build of imagecodecs can decode `syntax` (pydicom's plugin
    contract)."""
    import imagecodecs

    if syntax in (uid.JPEGLossless, uid.JPEGLosslessSV1):
        return bool(imagecodecs.JPEG8.available or imagecodecs.LJPEG.available)
    if syntax == uid.JPEGLSLossless:
        return bool(imagecodecs.JPEGLS.available)
    return syntax in _JPEG_2000 and bool(imagecodecs.JPEG2K.available)


def decode_frame(src: bytes, runner: base.DecodeRunner) -> bytes:
    """Return one decoded frame as pydicom expects it: samples interleaved, in a container of
    the codec's precision (pydicom's plugin contract)."""
    import imagecodecs

    syntax = runner.transfer_syntax
    frame: Any
    if syntax == uid.JPEGLSLossless:
        frame = imagecodecs.jpegls_decode(src)
    elif syntax in _JPEG_2000:
        frame = imagecodecs.jpeg2k_decode(src)
        if runner.photometric_interpretation in (
            PhotometricInterpretation.YBR_ICT,
            PhotometricInterpretation.YBR_RCT,
        ):
            # OpenJPEG undoes the component transform: the samples are RGB now
            runner.set_option("photometric_interpretation", PhotometricInterpretation.RGB)
    elif imagecodecs.JPEG8.available:
        frame = imagecodecs.jpeg8_decode(src)
    else:
        frame = imagecodecs.ljpeg_decode(src)
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)
    runner.set_option("bits_allocated", frame.dtype.itemsize * 8)
    return bytes(frame.tobytes())
