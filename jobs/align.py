"""Ray job entrypoint for the whole pipeline (prepare -> score-ref -> train -> serve check).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/align.py --config configs/demo.yaml
    bco-ray submit --address http://HEAD:8265 --config configs/demo.yaml      # the same, plus log streaming

Inside a job, Ray sets RAY_ADDRESS, so the stages join the cluster the job runs on.
Arguments are `bco-ray align`'s: --config FILE and dotted overrides.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir, if bco-ray is not installed

from bco_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
