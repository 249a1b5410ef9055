"""The doctor's checks, registered on import (hpctrain.doctor.registry): one module per topic. A new check is a
function with `@check(...)` in one of these modules, or a new module added to this list."""
from hpctrain.doctor.checks import (
    collectives,
    container,
    devices,
    launchers,
    mpi,
    network,
    run_dir,
    software,
    tf_config,
)

__all__ = ["collectives", "container", "devices", "launchers", "mpi", "network", "run_dir", "software", "tf_config"]
