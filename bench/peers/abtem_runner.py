"""Multislice HAADF image of one SrTiO3 [001] unit cell, run with abTEM in its own venv (bench.multislice).

    <abtem venv>/bin/python abtem_runner.py OUT.npz [--probes 14] [--configs 4] [--cells 8]

abTEM (GPL-3.0, https://github.com/abTEM/abTEM) is a simulator independent of stemd's own (stemd.sim): a
probe (200 kV, 20 mrad) scanned over one unit cell of a 4 x 4 cell supercell, `--cells` cells thick, frozen
phonons (`--configs` configurations, 0.08 Å rms), Lobato potentials, an annular detector of 70-160 mrad. The
crystal is periodic, so one cell's scan is the whole image: bench.multislice tiles and resamples it. Writes
the cell image (probes x probes, row = y), its settings and the abTEM version. Never imported by stemd.
"""

from __future__ import annotations

import argparse
import json
import time

import abtem
import ase
import numpy as np

A = 3.905  # SrTiO3 lattice constant, Å


def simulate(probes: int, configs: int, cells: int, seed: int = 1) -> tuple[np.ndarray, dict]:
    abtem.config.set({"local_diagnostics.progress_bar": False, "device": "cpu", "dask.scheduler": "synchronous"})
    unit = ase.Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                                   (0, 0.5, 0.5)], cell=[A, A, A], pbc=True)
    atoms = unit * (4, 4, cells)
    phonons = abtem.FrozenPhonons(atoms, num_configs=configs, sigmas=0.08, seed=seed)
    potential = abtem.Potential(phonons, sampling=0.05, slice_thickness=A / 2, projection="infinite",
                                parametrization="lobato")
    probe = abtem.Probe(energy=200e3, semiangle_cutoff=20)
    scan = abtem.GridScan(start=(0, 0), end=(A, A), gpts=(probes, probes), endpoint=False)
    detector = abtem.AnnularDetector(inner=70, outer=160)
    image = np.asarray(probe.scan(potential, scan=scan, detectors=detector).compute().array, np.float64)
    settings = {"energy_kv": 200, "semiangle_mrad": 20, "detector_mrad": [70, 160], "sampling_A": 0.05,
                "thickness_A": cells * A, "frozen_phonons": configs, "sigma_A": 0.08, "probes_per_cell": probes,
                "lattice_A": A, "abtem": abtem.__version__}
    return image.T, settings  # abTEM's first scan axis is x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--probes", type=int, default=14)
    p.add_argument("--configs", type=int, default=4)
    p.add_argument("--cells", type=int, default=8)
    args = p.parse_args()
    start = time.perf_counter()
    image, settings = simulate(args.probes, args.configs, args.cells)
    settings["seconds"] = round(time.perf_counter() - start, 1)
    np.savez(args.out, image=image, settings=json.dumps(settings))
    print(json.dumps(settings))


if __name__ == "__main__":
    main()
