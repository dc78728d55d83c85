"""What several benchmarks share: the standard simulated data set, built on first use."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "ReconstructionModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def standard_manifest(manifest=None):
    """The given manifest, or the standard simulated set, generated into ``.cache/simdata/<key>`` when missing
    (the key changes with the generator's inputs; progress bar on stderr)."""
    if manifest:
        if not Path(manifest).is_file():
            sys.exit(f"manifest not found: {manifest}")
        return str(manifest)
    from tqdm import tqdm

    from ReconstructionModuleLib.simulate import ensure_standard_set
    with tqdm(total=1000, desc="simulated data set", file=sys.stderr) as bar:
        def progress(fraction, message):
            bar.n = int(round(fraction * 1000))
            bar.set_postfix_str(message[:50], refresh=True)
        return str(ensure_standard_set(progress=progress))

