"""The network interface a site names for training traffic (`HPCTRAIN_NET_IFACE`), handed to every library that
would otherwise pick one itself. Framework-neutral, stdlib only.

Cluster nodes have several interfaces (the fast fabric, a management Ethernet, container bridges), and each
communication library chooses on its own: Open MPI's TCP transport stripes over every interface it finds,
Gloo and NCCL take the one the host name resolves to, TF's gRPC the address in TF_CONFIG. With
`HPCTRAIN_NET_IFACE=ib0` (one name, or a comma list) `apply()` sets, before any of them starts in this process:

  OMPI_MCA_btl_tcp_if_include   Open MPI's TCP transport between the ranks (read at MPI_Init)
  OMPI_MCA_oob_tcp_if_include   Open MPI's out-of-band channel of this process (mpirun's own daemons read it
                                from mpirun's environment or command line, not from here: see docs/slurm.md)
  HOROVOD_GLOO_IFACE            Horovod's Gloo controller and collectives (one interface: the first named)
  GLOO_SOCKET_IFNAME            torch.distributed's gloo (the ddp backend on CPU)
  NCCL_SOCKET_IFNAME            NCCL's sockets (bootstrap, and the data when there is no InfiniBand); `=` prefixed:
                                the exact names, not NCCL's prefix match

and `node_address()` gives the first named interface's IPv4 address, which hpctrain puts into TF_CONFIG (and
uses as the torch.distributed rendezvous) instead of the host name. A variable the environment already sets
is kept: the user's or the launcher's own choice wins (horovodrun --network-interface, mpirun --mca). A name
that is no interface of this node is a one-line UserError listing the interfaces that exist.
"""
from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

from hpctrain.errors import UserError

SETTING = "HPCTRAIN_NET_IFACE"
LIBRARIES = {  # variable -> the library it steers (for the log line)
    "OMPI_MCA_btl_tcp_if_include": "Open MPI",
    "OMPI_MCA_oob_tcp_if_include": "Open MPI",
    "HOROVOD_GLOO_IFACE": "Horovod Gloo",
    "GLOO_SOCKET_IFNAME": "torch gloo",
    "NCCL_SOCKET_IFNAME": "NCCL",
}
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class NetIfaceError(UserError):
    """HPCTRAIN_NET_IFACE names an interface this node does not have, or one without an IPv4 address."""


def interfaces() -> list[str]:
    """This node's interface names (lo included), as the kernel lists them."""
    return [name for _, name in socket.if_nameindex()]


def names(env: MutableMapping[str, str] = os.environ) -> list[str]:
    """The interfaces the setting names, in its order; [] when it is unset or empty."""
    return [n.strip() for n in env.get(SETTING, "").split(",") if n.strip()]


def library_settings(chosen: list[str]) -> dict[str, str]:
    """What each library is told for interfaces `chosen` (the first alone where a library takes one)."""
    joined = ",".join(chosen)
    return {"OMPI_MCA_btl_tcp_if_include": joined, "OMPI_MCA_oob_tcp_if_include": joined,
            "HOROVOD_GLOO_IFACE": chosen[0], "GLOO_SOCKET_IFNAME": joined, "NCCL_SOCKET_IFNAME": f"={joined}"}


@dataclass
class Applied:
    chosen: list[str]
    added: list[str] = field(default_factory=list)        # variables set here
    kept: dict[str, str] = field(default_factory=dict)    # variables the environment already set: their values

    def line(self) -> str | None:
        """One log line: the interface, who got it, and what the environment kept; None without the setting."""
        if not self.chosen:
            return None
        libs = ", ".join(dict.fromkeys(LIBRARIES[k] for k in self.added))
        text = f"network interface {','.join(self.chosen)} ({SETTING})" + (f" for {libs}" if libs else "")
        if self.kept:
            text += "; kept the environment's own " + ", ".join(f"{k}={v}" for k, v in self.kept.items())
        return text


def check(chosen: list[str], existing: list[str] | None = None) -> None:
    """Every name must be an interface of this node: else one line naming the value and what exists."""
    existing = interfaces() if existing is None else existing
    unknown = [n for n in chosen if n not in existing]
    if unknown:
        raise NetIfaceError(f"{SETTING}={','.join(chosen)!r}: no interface {', '.join(unknown)} on node "
                            f"{socket.gethostname()} (its interfaces: {', '.join(sorted(existing)) or 'none'})")


def apply(env: MutableMapping[str, str] = os.environ, existing: list[str] | None = None) -> Applied:
    """With the setting: check it and set each library variable the environment lacks. Call before MPI,
    Horovod, torch.distributed or TF start in this process."""
    chosen = names(env)
    done = Applied(chosen)
    if not chosen:
        return done
    check(chosen, existing)
    for var, value in library_settings(chosen).items():
        if var in env:
            done.kept[var] = env[var]
        else:
            env[var] = value
            done.added.append(var)
    return done


def ipv4(name: str) -> str:
    """The IPv4 address of interface `name` on this node (Linux); OSError when it has none."""
    import fcntl  # Linux/Unix only, like the ioctl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
    return socket.inet_ntoa(packed[20:24])


def node_address(env: MutableMapping[str, str] = os.environ,
                 lookup: Callable[[str], str] = ipv4) -> str:
    """How other nodes should reach this one for TF_CONFIG and rendezvous: the first named interface's IPv4
    address with the setting, else the host name."""
    chosen = names(env)
    if not chosen:
        return socket.gethostname()
    try:
        return lookup(chosen[0])
    except OSError:
        raise NetIfaceError(f"{SETTING}={','.join(chosen)!r}: interface {chosen[0]} has no IPv4 address on node "
                            f"{socket.gethostname()}") from None
