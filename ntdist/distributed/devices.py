"""Which device a rank trains on, which one its collectives use, and that no two ranks share a GPU.

- `training_device(local_rank)`: GPU local rank mod the GPUs this process sees, else the CPU;
- `comm_device(world)`: where tensors that cross ranks live: the training GPU under NCCL, the CPU under
  gloo (gloo sends, receives, gathers and scatters only CPU tensors, also on a GPU machine);
- `check_own_gpu(store, ...)`: under NCCL, every rank publishes its GPU's UUID in the rendezvous store
  before the process group starts, so more ranks on a node than GPUs are refused in one line instead
  of by NCCL's duplicate-GPU error, which looks like a network problem;
- `synchronize(device)`: wait for a GPU's queued kernels before reading a timing or reporting work done.
"""

import torch

from ntdist.errors import UserError


def training_device(local_rank: int) -> torch.device:
    """This rank's device: GPU local rank mod the GPUs it sees, else the CPU. With one GPU visible per task
    (srun --gpus-per-task=1) every rank's is cuda:0; `world.export_engine_variables` tells the engines so."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


def comm_device(world) -> torch.device:
    """Where the tensors of `world`'s collectives live: its training GPU under NCCL, else the CPU."""
    return world.device if world.backend == "nccl" else torch.device("cpu")


def gpu_name(host: str, device: torch.device) -> str:
    """'<host> <uuid>' of a GPU: equal for two ranks exactly when they share a physical GPU, whatever index each
    sees it under (CUDA_VISIBLE_DEVICES, SLURM's per-task binding)."""
    return f"{host} {torch.cuda.get_device_properties(device).uuid}"


def check_own_gpu(store, rank: int, size: int, gpu: str) -> None:
    """Refuse two ranks on one GPU (`gpu` from `gpu_name`) on every rank concerned; waits in `store` until all
    `size` ranks have published theirs."""
    store.set(f"gpu/{rank}", gpu)
    names = [name.decode(errors="replace") for name in store.multi_get([f"gpu/{r}" for r in range(size)])]
    twins = [r for r, name in enumerate(names) if name == gpu and r != rank]
    if twins:
        host, uuid = gpu.split(" ", 1)
        raise UserError(f"ranks {rank} and {twins[0]} share GPU {uuid} on {host} ({names.count(gpu)} ranks on it), "
                        "but NCCL needs a GPU of its own for every rank; start at most as many ranks per node as it "
                        "has GPUs (torchrun --nproc_per_node, srun --ntasks-per-node, or --gpus-per-task=1)")


def synchronize(device) -> None:
    """Wait for the kernels queued on `device` (nothing to wait for on the CPU): before a timing is read or a
    rank reports its work finished."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
