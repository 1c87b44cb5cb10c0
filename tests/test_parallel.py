"""Branch-parallel guidance (fastguide.parallel) on gloo: 3 processes spawned once per module (spawn costs
several seconds each), 2-rank cases on the subgroup {0, 1} (rank 2 computes their single-process references
meanwhile), 3-rank cases on the whole group. Every collective runs under the group's timeout, the spawn under
a hard join timeout; leftovers are killed. Each test reads its case's results from the shared run.

Measured rounding (CPU fp32, lab UNet): a rank evaluates its rows in a smaller batch than the single process,
and the final latents differ by at most ~1e-6 (asserted < 1e-4 here; the measured figures are in
bench/NOTES.md); ranks are bitwise equal.
"""
import datetime
import os
import pickle
import queue
import socket
import traceback

import pytest
import torch

import fastguide

TIMEOUT = 150  # hard limit for the whole spawned run (s)
GROUP_TIMEOUT = 60  # every collective (s)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Counts every torch.distributed collective called (by name)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "barrier",
             "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter", "reduce",
             "all_gather_object", "broadcast_object_list")

    def __init__(self):
        import torch.distributed as dist
        self.calls = []
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return counted

    def take(self):
        out, self.calls = self.calls, []
        return out


def _latents(out):
    return out.images.detach().clone()


def _run_cases(rank, world, results):
    import time
    import torch.distributed as dist
    import fastguide
    import fastguide.diffusers as fd
    import fastguide.parallel as fp
    from fastguide import lab
    from fastguide.lab.run import _pag_config

    if os.environ.get("FG_DEBUG"):
        print(f"rank {rank} imported {time.monotonic():.1f}", flush=True)
    counter = _Counter()
    pipe = lab.pipeline()
    pair = dist.new_group([0, 1])  # every rank must create it
    steps = 8

    def call(guider, labels, seed=0, n=steps):
        g = torch.Generator().manual_seed(seed)
        return pipe(class_labels=labels, num_inference_steps=n, generator=g, guider=guider, output_type="latent")

    def cfg(**kw):
        return fd.ClassifierFreeGuidance(guidance_scale=3.0, **kw)

    def ag():  # x0-space AG: switches samples at different steps of an 8-step run (partial steps)
        return cfg(adaptive=fastguide.AG(0.9), scheduler=pipe.scheduler)

    def pag():
        return fd.PerturbedAttentionGuidance(guidance_scale=3.0, perturbed_guidance_scale=2.0,
                                             perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                             perturbed_guidance_config=_pag_config())

    two = [("cfg2", cfg, [3, 7, 1]), ("ag2", ag, [0, 1, 2, 3, 4, 5]), ("pag2", pag, [3, 7, 1])]
    three = [("cfg3", cfg, [2, 5]), ("ag3", ag, [0, 1, 2, 3, 4, 5]), ("pag3", pag, [4, 8]), ("idle3", cfg, [6])]

    def parallel(name, make, labels, group):
        if os.environ.get("FG_DEBUG"):
            print(f"rank {rank} {name} {time.monotonic():.1f}", flush=True)
        guider = fp.distribute(make(), group=group)
        counter.take()
        out = call(guider, labels)
        results[name] = dict(latents=_latents(out), calls=counter.take(), report=guider.parallel_report,
                             nfe=out.nfe, ag=getattr(guider, "report", None))

    def single(name, make, labels):
        guider = make()
        out = call(guider, labels)
        results[name + "/single"] = dict(latents=_latents(out), nfe=out.nfe, ag=getattr(guider, "report", None))

    for name, make, labels in two:
        if rank < 2:
            parallel(name, make, labels, pair)
        else:
            single(name, make, labels)
    for name, make, labels in three:
        parallel(name, make, labels, None)
    if rank == 0:
        for name, make, labels in three:
            single(name, make, labels)

    # fastguide.enable(lab pipeline, ..., parallel=group): the pipeline takes a guider, enable installs the
    # method's guider and distributes it: the same run as "cfg2"
    if rank < 2:
        lab_pipe = lab.pipeline()
        fastguide.enable(lab_pipe, guidance="cfg", scale=3.0, parallel=pair)
        out = lab_pipe(class_labels=[3, 7, 1], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                       output_type="latent")
        results["enable_lab"] = dict(latents=_latents(out), rows=lab_pipe.guider.parallel_report.rows)

    # the raw guider protocol as modular pipelines drive it: the latents go to the denoiser directly (full batch,
    # reduced to each share by the guider's pre-hook), only the embeddings through prepare_inputs. Sample 0's
    # two embeddings are equal, so AG (prediction space) switches it at step 0: partial steps from step 1.
    class Toy(torch.nn.Module):
        def forward(self, sample, t, emb=None):
            return torch.tanh(sample * emb[:, :, None, None] + 1e-4 * t)

    def raw(guider):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(3, 4, 5, 5, generator=g)
        cond = torch.randn(3, 4, generator=g)
        uncond = torch.cat([cond[:1], torch.randn(2, 4, generator=g)])
        toy = Toy()
        for i in range(6):
            guider.set_state(step=i, num_inference_steps=6, timestep=torch.tensor(900.0 - 150 * i))
            batches = guider.prepare_inputs({"emb": (cond, uncond)})
            for b in batches:
                guider.prepare_models(toy)
                b.noise_pred = toy(x, torch.tensor(900.0 - 150 * i), emb=b.emb)
                guider.cleanup_models(toy)
            x = x - 0.2 * guider(batches).pred
        return x, guider.report

    def make_raw():
        return fd.ClassifierFreeGuidance(guidance_scale=2.0, adaptive=fastguide.AG(0.9999, space="prediction"))
    if rank < 2:
        guider = fp.distribute(make_raw(), group=pair)
        x, rep = raw(guider)
        results["raw"] = dict(x=x, ag=rep, rows=guider.parallel_report.rows)
    else:
        x, rep = raw(make_raw())
        results["raw/single"] = dict(x=x, ag=rep)

    # the classic route: fastguide.enable(pipe, ..., parallel=group) on a tiny random-weight SD pipeline
    from test_pipelines import inputs, make_sd
    sd_cases = [("sd_cfg2", dict(guidance="cfg", scale=5.0), 2),
                ("sd_ag2", dict(guidance="cfg", scale=5.0, adaptive=fastguide.AG(-1.0, space="prediction")), 1)]
    for name, kw, images in sd_cases:
        sd = make_sd()
        if rank < 2:
            fastguide.enable(sd, **kw, parallel=pair)
            counter.take()
        else:
            fastguide.enable(sd, **kw)
        kw_in = {k: torch.cat([v, v.flip(-1)][:images]) for k, v in inputs("sd").items()}  # B = images
        with torch.no_grad():
            lat = sd(**kw_in, num_inference_steps=4, guidance_scale=5.0, output_type="latent", height=16,
                     width=16).images
        if rank < 2:
            split = sd._fastguide.parallel
            results[name] = dict(latents=lat, calls=counter.take(), report=split.report)
        else:
            results[name + "/single"] = dict(latents=lat, nfe=sd.fastguide_report.nfe)

    # x0-space AG needs the denoiser's input on every rank: B = 1 on 3 ranks leaves one idle -> all raise alike
    try:
        call(fp.distribute(ag(), group=None), [4])
        results["idle_x0"] = "no error"
    except Exception as e:  # noqa: BLE001
        results["idle_x0"] = f"{type(e).__name__}: {e}"

    # a rank raising inside the denoiser at step 2 (on the pair, then the whole group)
    for name, group, members in (("raise2", pair, (0, 1)), ("raise3", None, (0, 1, 2))):
        if rank not in members:
            continue
        inner = boom = None
        if rank == 1:
            seen, inner = [], pipe.unet.forward

            def boom(*args, **kwargs):  # rank 1's third denoiser call (one share per step): step 2
                seen.append(1)
                if len(seen) == 3:
                    raise RuntimeError("boom on purpose")
                return inner(*args, **kwargs)
            pipe.unet.forward = boom
        try:
            call(fp.distribute(cfg(), group=group), [1, 2])
            results[name] = "no error"
        except Exception as e:  # noqa: BLE001
            results[name] = f"{type(e).__name__}: {e}"
        # the guider's hooks and forward wrapper are gone, the test's own forward is back
        results[name + "/hooks_left"] = (len(pipe.unet._forward_pre_hooks)
                                         + (pipe.unet.__dict__.get("forward") is not boom))
        pipe.unet.__dict__.pop("forward", None)

    if os.environ.get("FG_DEBUG"):
        print(f"rank {rank} mismatch {time.monotonic():.1f}", flush=True)
    # a rank failing OUTSIDE the guider's step (its scheduler, after step 2's exchange) under fp.guard(): the
    # peer waits in step 3's exchange until the group's timeout (5 s here), then raises naming rank 1
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=5))  # every rank creates a group
    if rank < 2:
        step = pipe.scheduler.step
        if rank == 1:
            seen = []

            def failing_step(*args, **kwargs):
                seen.append(1)
                if len(seen) == 3:
                    raise RuntimeError("scheduler boom")
                return step(*args, **kwargs)
            pipe.scheduler.step = failing_step
        t0 = time.monotonic()
        try:
            with fp.guard():
                call(fp.distribute(cfg(), group=short), [1, 2])
            results["outside"] = "no error"
        except Exception as e:  # noqa: BLE001
            results["outside"] = f"{type(e).__name__}: {e}"
        results["outside/s"] = time.monotonic() - t0
        pipe.scheduler.__dict__.pop("step", None)

    # mismatched settings at the first step: seed (the latents pass through the lab pipeline's guider), steps
    if rank < 2:
        for name, kw in (("seed", dict(seed=rank)), ("steps", dict(n=steps + rank)),
                         ("scale", dict())):
            guider = fp.distribute(fd.ClassifierFreeGuidance(guidance_scale=3.0 + (rank if name == "scale" else 0)),
                                   group=pair)
            try:
                call(guider, [1, 2], **kw)
                results["mismatch/" + name] = "no error"
            except Exception as e:  # noqa: BLE001
                results["mismatch/" + name] = f"{type(e).__name__}: {e}"


def _worker(rank, world, port, out_q):
    if os.environ.get("FG_DEBUG"):
        import time
        print(f"rank {rank} started {time.monotonic():.1f}", flush=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    results = {}
    try:
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
        _run_cases(rank, world, results)
        out_q.put(pickle.dumps((rank, results, None)))  # bytes: tensors through a Queue need a live sender
    except BaseException:  # noqa: BLE001
        out_q.put(pickle.dumps((rank, results, traceback.format_exc())))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture(scope="module")
def runs():
    import time
    import torch.multiprocessing as mp
    # forkserver: a fresh interpreter imports torch / diffusers / fastguide ONCE (the bulk of the start-up on a
    # loaded 2-core box), then forks the ranks from it; nothing of this pytest process is inherited.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "diffusers", "fastguide.diffusers", "fastguide.parallel",
                                "fastguide.lab.digits", "fastguide.lab.run"])
    q = ctx.Queue()
    world, port = 3, _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q), daemon=True) for r in range(world)]
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the forkserver when it starts
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    got, deadline = {}, time.monotonic() + TIMEOUT
    try:
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, results, err = pickle.loads(q.get(timeout=left))
            except queue.Empty:
                break
            got[rank] = (results, err)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    missing = sorted(set(range(world)) - set(got))
    assert not missing, f"ranks {missing} did not report within {TIMEOUT} s"
    errors = {r: e[-2000:] for r, (_, e) in got.items() if e}
    assert not errors, f"ranks failed: {errors}"
    return [got[r][0] for r in range(world)]


@pytest.mark.parametrize("case,ranks", [("cfg2", 2), ("ag2", 2), ("pag2", 2), ("cfg3", 3), ("ag3", 3), ("pag3", 3),
                                        ("idle3", 3)])
def test_ranks_bitwise_equal_and_match_single_process(runs, case, ranks):
    outs = [runs[r][case] for r in range(ranks)]
    single = runs[2 if ranks == 2 else 0][case + "/single"]
    for o in outs[1:]:
        assert torch.equal(o["latents"], outs[0]["latents"])  # bitwise
    diff = (outs[0]["latents"] - single["latents"]).abs().max().item()
    assert diff < 1e-4, f"{case}: parallel vs single process differ by {diff}"
    # every row evaluated exactly once across the ranks
    assert sum(o["report"].rows for o in outs) == single["nfe"]
    print(f"{case}: max |parallel - single| = {diff:.3g}")


def test_ag_switches_mid_run_and_ranks_rebalance(runs):
    for case in ("ag2", "ag3"):
        ag = runs[0][case]["ag"]
        switched = [s for s in ag.ag_switch_step if s is not None]
        # some samples switch before the end, at different steps: partial steps were split across ranks
        assert switched and len(set(switched)) > 1, ag.ag_switch_step
        assert ag.ag_switch_step == runs[2 if case == "ag2" else 0][case + "/single"]["ag"].ag_switch_step
        assert ag.nfe_skipped > 0
        rows = [runs[r][case]["report"].rows for r in range(2 if case == "ag2" else 3)]
        assert max(rows) - min(rows) <= 8  # at most one row apart per step


def test_enable_parallel_on_a_pipeline_taking_a_guider(runs):
    for r in (0, 1):
        assert torch.equal(runs[r]["enable_lab"]["latents"], runs[r]["cfg2"]["latents"])
    assert [runs[r]["enable_lab"]["rows"] for r in (0, 1)] == [3 * 8, 3 * 8]  # one branch per rank


def test_raw_guider_with_latents_passed_to_the_denoiser_directly(runs):
    single = runs[2]["raw/single"]
    assert single["ag"].ag_switch_step == [0, None, None]  # partial steps (uncond rows [1, 2]) from step 1
    for r in (0, 1):
        assert torch.equal(runs[r]["raw"]["x"], single["x"])  # an elementwise toy: no batch rounding at all
        assert runs[r]["raw"]["ag"].ag_switch_step == [0, None, None]
    # 6 rows at step 0 (3 / 3), then 3 cond + 2 uncond rows (3 / 2)
    assert [runs[r]["raw"]["rows"] for r in (0, 1)] == [3 + 3 * 5, 3 + 2 * 5]


def test_pag_three_branches_split_rows_over_two_ranks(runs):
    # 3 branches x 3 samples = 9 rows per step, split 5 / 4; at step 0 diffusers' PAG window (start < step)
    # leaves 2 branches: 3 / 3
    assert [runs[r]["pag2"]["report"].rows for r in (0, 1)] == [3 + 5 * 7, 3 + 4 * 7]


def test_idle_rank_is_reported(runs):
    for r in range(3):
        assert runs[r]["idle3"]["report"].idle == [(s, [2]) for s in range(8)]
    assert runs[2]["idle3"]["report"].rows == 0


@pytest.mark.parametrize("case,ranks", [("cfg2", 2), ("pag2", 2), ("ag3", 3)])
def test_one_collective_per_step(runs, case, ranks):
    """N steps: N data exchanges plus the first step's header exchange; no other collective."""
    for r in range(ranks):
        calls = runs[r][case]["calls"]
        assert len(calls) == 8 + 1 and set(calls) <= {"all_gather_single", "all_gather_into_tensor"}, calls
        assert runs[r][case]["report"].collectives == 9


@pytest.mark.parametrize("case,members", [("raise2", (0, 1)), ("raise3", (0, 1, 2))])
def test_a_rank_raising_makes_every_rank_raise_naming_it(runs, case, members):
    for r in members:
        msg = runs[r][case]
        assert msg.startswith("ParallelError") and "rank 1 failed at step 2" in msg and "boom on purpose" in msg, msg
        assert runs[r][case + "/hooks_left"] == 0


@pytest.mark.parametrize("name,what", [("seed", "guider inputs"), ("steps", "schedule"), ("scale", "guider settings")])
def test_mismatched_settings_raise_at_the_first_step(runs, name, what):
    for r in (0, 1):
        msg = runs[r]["mismatch/" + name]
        assert msg.startswith("ParallelError") and "step 0" in msg and what in msg, msg


def test_idle_rank_with_an_x0_policy_raises_on_every_rank(runs):
    for r in range(3):
        msg = runs[r]["idle_x0"]
        assert msg.startswith("ParallelError") and "ranks [2] idle" in msg and "x0" in msg, msg


@pytest.mark.parametrize("case", ["sd_cfg2", "sd_ag2"])
def test_enable_parallel_classic_pipeline(runs, case):
    """enable(pipe, ..., parallel=group): rows of the [uncond, cond] batch split over 2 ranks, one all-gather
    per step (plus the first call's header exchange); AG at B = 1 leaves one row: rank 1 idle, reported."""
    a, b, single = runs[0][case], runs[1][case], runs[2][case + "/single"]
    assert torch.equal(a["latents"], b["latents"])
    diff = (a["latents"] - single["latents"]).abs().max().item()
    scale = single["latents"].abs().max().item()
    assert diff <= 1e-5 * scale, (diff, scale)
    assert a["report"].rows + b["report"].rows == single["nfe"]
    assert len(a["calls"]) == 4 + 1 and a["report"].collectives == 5, (a["report"], single["nfe"])
    if case == "sd_ag2":
        assert b["report"].idle == [(s, [1]) for s in (1, 2, 3)] and b["report"].rows == 1
    print(f"{case}: max |parallel - single| = {diff:.3g} (latents up to {scale:.3g})")


def test_a_rank_failing_outside_the_step_makes_the_peer_raise_at_the_timeout_naming_it(runs):
    assert runs[1]["outside"] == "RuntimeError: scheduler boom"  # its own error, recorded by fp.guard()
    msg = runs[0]["outside"]
    assert msg.startswith("ParallelError") and "exchange of step 3 failed" in msg, msg
    assert "rank 1: RuntimeError: scheduler boom" in msg, msg
    assert runs[0]["outside/s"] < 40  # the 5 s group timeout, not a hang


def test_plan_shares():
    from fastguide.parallel import plan
    assert plan([4, 4], 2) == [[(0, 0, 4)], [(1, 0, 4)]]  # CFG on 2 ranks: whole branches
    assert plan([3, 3, 3], 2) == [[(0, 0, 3), (1, 0, 2)], [(1, 2, 3), (2, 0, 3)]]
    assert plan([4, 1], 2) == [[(0, 0, 3)], [(0, 3, 4), (1, 0, 1)]]  # AG left one uncond row
    assert plan([1, 1], 3) == [[(0, 0, 1)], [(1, 0, 1)], []]  # B = 1 on 3 ranks: one idle


# --- in-process checks (no spawn) -----------------------------------------------------------------------
def test_no_process_group_is_a_clear_error_before_anything_changes(monkeypatch):
    import torch.distributed as dist
    import fastguide.diffusers as fd
    import fastguide.parallel as fp
    from test_pipelines import make_sd
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    guider = fd.ClassifierFreeGuidance(guidance_scale=3.0)
    with pytest.raises(RuntimeError, match="init_from_env"):
        fp.distribute(guider)
    assert type(guider) is fd.ClassifierFreeGuidance
    pipe = make_sd()
    with pytest.raises(RuntimeError, match="init_from_env"):
        fastguide.enable(pipe, guidance="cfg", parallel=True)
    with pytest.raises(TypeError, match="parallel must be"):
        fastguide.enable(pipe, guidance="cfg", parallel="yes")
    assert not fastguide.pipelines.is_enabled(pipe)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="RANK.*torchrun"):
        fp.init_from_env()
    with pytest.raises(TypeError, match="BaseGuidance"):
        fp.distribute(object())


@pytest.fixture
def world1():
    """A 1-rank gloo group in this process (an in-memory store: no port), destroyed afterwards."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    yield
    dist.destroy_process_group()


def test_distribute_keeps_name_config_and_undistribute_restores(world1, tmp_path):
    import fastguide.diffusers as fd
    import fastguide.parallel as fp
    guider = fd.ClassifierFreeGuidance(guidance_scale=3.0, adaptive=fastguide.AG(0.9, space="prediction"))
    config = dict(guider.config)
    fp.distribute(guider)
    assert type(guider).__name__ == "ClassifierFreeGuidance" and isinstance(guider, fd.ClassifierFreeGuidance)
    assert dict(guider.config) == config
    guider.save_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    loaded = fd.ClassifierFreeGuidance.from_pretrained(tmp_path)
    assert public(loaded.config) == public(config) and type(loaded) is fd.ClassifierFreeGuidance
    import json
    assert json.loads((tmp_path / "guider_config.json").read_text())["_class_name"] == "ClassifierFreeGuidance"
    twin = guider.new(guidance_scale=4.0)  # the distributed class without a group state: single process
    twin.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    assert len(twin.prepare_inputs({"x": (torch.zeros(2, 1), torch.ones(2, 1))})) == 2
    fp.undistribute(guider)
    assert type(guider) is fd.ClassifierFreeGuidance and "_par" not in guider.__dict__
