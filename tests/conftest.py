import torch

# tiny models on a 2-core machine: one intra-op thread avoids spinning threads fighting each other
torch.set_num_threads(1)
