"""The container this rank runs in, and the MPI settings its runtime left unset (hpctrain.image applies them)."""
from __future__ import annotations

from hpctrain import image
from hpctrain.doctor.common import Context
from hpctrain.doctor.registry import Outcome, check


@check("container", order=45)
def container(ctx: Context) -> Outcome:
    runtime = image.runtime()
    if runtime is None:
        return "SKIP", "not in a container", None
    if runtime not in image.PER_RANK_RUNTIMES:
        return "PASS", f"{runtime}: the launcher runs in the same container as the ranks; no image settings needed", \
            None
    added = ctx.facts.get("image_missing", [])
    if not added:
        return "PASS", f"{runtime}: its environment sets every MPI setting the image needs", None
    settings = ", ".join(f"{k}={image.IMAGE_SETTINGS[k]}" for k in added)
    return ("WARN", f"{runtime}: its environment lacks {settings}; hpctrain sets them in its own processes",
            "other MPI programs in this image need them too: export them through the launcher (mpirun -x NAME, "
            "or the runtime's environment option)")
