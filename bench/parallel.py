"""Branch-parallel guidance (fastguide.parallel): step time on 1 rank vs N ranks, and bytes exchanged per step,
on the lab's trained pipeline (fastguide.lab.pipeline(), a real diffusers pipeline taking a guider).

    torchrun --nproc-per-node 2 bench/parallel.py                     # CPU: gloo, 1 thread per rank
    torchrun --nproc-per-node 2 bench/parallel.py --device cuda       # GPUs: NCCL, one GPU per rank
    python bench/parallel.py                                          # 1 rank only (the baseline)

Method: the same pipeline call (CFG 3, or CFG + PAG: 3 branches) on a batch of --batch labels, --steps steps,
timed --repeat times after one warm-up call; the baseline is the single-process call (no process group in the
call: `fastguide.diffusers` guider, same threads per process) timed on rank 0 while the other ranks wait at a
barrier. Step time = wall time of the call / steps (the median of the repeats). Bytes: what each rank puts
into the step's all-gather (its slot: 512-byte header + its padded share of the predictions); every rank
receives world x that. Also checked: every rank ends with bitwise the same latents, and their distance to the
single-process result.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 64], help="samples per call")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, LOCAL_RANK's GPU)")
    ap.add_argument("--guiders", nargs="+", default=["cfg", "pag"], choices=["cfg", "pag", "cfg_ag"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import torch.distributed as dist
    import fastguide
    import fastguide.diffusers as fd
    import fastguide.parallel as fp
    from fastguide import lab
    from fastguide.lab.run import _pag_config

    distributed = "RANK" in os.environ
    if distributed:
        rank, world = fp.init_from_env(backend="nccl" if args.device == "cuda" else "gloo", timeout=300)
    else:
        rank, world = 0, 1
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    pipe = lab.pipeline().to(device)

    def make(name):
        if name == "cfg":
            return fd.ClassifierFreeGuidance(guidance_scale=3.0)
        if name == "cfg_ag":
            return fd.ClassifierFreeGuidance(guidance_scale=3.0, adaptive=fastguide.AG(), scheduler=pipe.scheduler)
        return fd.PerturbedAttentionGuidance(guidance_scale=3.0, perturbed_guidance_scale=1.0,
                                             perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                             perturbed_guidance_config=_pag_config())

    def timed(guider, labels):
        def once():
            g = torch.Generator().manual_seed(0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = pipe(class_labels=labels, num_inference_steps=args.steps, generator=g, guider=guider,
                       output_type="latent")
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out, time.perf_counter() - t0
        once()  # warm-up
        runs = [once() for _ in range(args.repeat)]
        return runs[-1][0], statistics.median(t for _, t in runs) / args.steps

    if rank == 0:
        print(f"# fastguide.parallel bench: {world} rank(s), device {device}, {args.threads} thread(s) per rank, "
              f"{args.steps} steps, torch {torch.__version__}")
        cols = ["guider", "batch", "1 rank ms/step"]
        if world > 1:
            cols += [f"{world} ranks ms/step", "speed-up", "bytes sent / rank / step", "bytes received / rank / step",
                     "collectives / call", "in the collective ms/step", "max abs diff vs 1 rank"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    for name in args.guiders:
        for batch in args.batch:
            labels = [i % 10 for i in range(batch)]
            single = None
            if rank == 0:
                single_out, single_t = timed(make(name), labels)
                single = single_out.images
            if world == 1:
                print(f"| {name} | {batch} | {single_t * 1e3:.2f} |")
                continue
            dist.barrier()
            guider = fp.distribute(make(name))
            out, t = timed(guider, labels)
            rep = guider.parallel_report
            lat = out.images.contiguous()
            gathered = [torch.empty_like(lat) for _ in range(world)]
            dist.all_gather(gathered, lat)
            same = all(torch.equal(g, gathered[0]) for g in gathered)
            if rank == 0:
                sent = (rep.bytes_sent - fp.HEADER_BYTES) / rep.steps  # the data exchange; + one 512-byte header
                diff = (lat.cpu() - single.cpu()).abs().max().item()
                row = [name, batch, f"{single_t * 1e3:.2f}", f"{t * 1e3:.2f}", f"{single_t / t:.2f}x", f"{sent:.0f}",
                       f"{sent * world:.0f}", rep.collectives, f"{rep.exchange_s / rep.steps * 1e3:.2f}",
                       f"{diff:.2g}" + ("" if same else " (RANKS DIFFER)")]
                print("| " + " | ".join(map(str, row)) + " |")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
