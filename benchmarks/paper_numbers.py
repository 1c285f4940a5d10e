"""The paper's ILQ numbers, in one place for the benchmark scripts (paper_tables.py, protocol.py): Liu et al.,
"Imagination-Limited Q-Learning for Offline Reinforcement Learning", IJCAI 2025, Tables 1 (MuJoCo -v2) and 2 (Maze2D
-v1, Adroit pen -v0). No dependency beyond Python, so that the GPU command can read it without submitit."""

PAPER = {  # Liu et al., IJCAI 2025, Tables 1-2, ILQ: normalised score, mean ± std over 5 seeds of the last 10 evaluations
    "halfcheetah-random": (31.7, 0.7), "hopper-random": (31.6, 0.2), "walker2d-random": (21.6, 0.1),
    "halfcheetah-medium": (65.7, 0.5), "hopper-medium": (92.1, 5.8), "walker2d-medium": (91.5, 0.7),
    "halfcheetah-medium-replay": (59.6, 1.0), "hopper-medium-replay": (102.7, 0.3), "walker2d-medium-replay": (95.3, 1.8),
    "halfcheetah-medium-expert": (100.0, 0.4), "hopper-medium-expert": (111.6, 0.6), "walker2d-medium-expert": (117.0, 1.2),
    "maze2d-umaze": (91.9, 26.0), "maze2d-umaze-dense": (116.2, 15.4), "maze2d-medium": (163.6, 31.4),
    "maze2d-medium-dense": (137.8, 9.2), "maze2d-large": (198.5, 23.8), "maze2d-large-dense": (152.8, 10.4),
    "pen-human": (77.3, 7.9), "pen-cloned": (85.6, 10.2),
}  # fmt: skip
