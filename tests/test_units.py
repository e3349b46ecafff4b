"""One convention for sizes (skrr_export.units): binary units, the unit chosen by size unless fixed."""

from __future__ import annotations

from skrr_export.units import size, size_exact


def test_sizes_are_binary_and_the_unit_can_be_fixed():
    assert size(1_662_750_720) == "1.55 GiB"  # the PixArt int4 export the issue quotes as 1,585.72 MiB / 1,662.75 MB
    assert size(5_531_471_872) == "5.15 GiB" and size(1023) == "1,023 B" and size(4096) == "4.00 KiB"
    assert size(263 * 10**6) == "250.82 MiB" and size(None) == "unknown"
    assert size(0.6 * 2**30, "GiB", 1) == "0.6 GiB" and size(0, "GiB", 1) == "0.0 GiB"  # a need beside a limit
    assert size_exact(1_662_750_720) == "1.55 GiB (1,662,750,720 bytes)"
