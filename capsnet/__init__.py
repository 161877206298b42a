"""Support code for capsule_network.py (the script holds the paper's model, loss and training
loop): data sets, faster CPU paths, meters, figures, Visdom, checkpoints, devices and torchrun,
and the command line. Nothing here imports the script."""
