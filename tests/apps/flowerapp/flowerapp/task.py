"""flowerapp: a tiny model and synthetic data, generated offline with a fixed seed."""

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES, CLASSES = 8, 3
_TRUE_WEIGHTS = np.random.default_rng(2024).standard_normal((FEATURES, CLASSES))


class Net(nn.Module):
    """A two-layer perceptron."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def load_data(partition_id: int, num_partitions: int, batch_size: int = 16):
    """Train and test loaders of one partition: 96 + 32 labelled points of its own seed."""
    rng = np.random.default_rng([7, partition_id, num_partitions])
    x = rng.standard_normal((128, FEATURES)).astype(np.float32)
    y = np.argmax(x @ _TRUE_WEIGHTS + 0.3 * rng.standard_normal((128, CLASSES)), axis=1)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    train, test = torch.utils.data.random_split(data, [96, 32], generator=torch.Generator().manual_seed(partition_id))
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(test, batch_size=batch_size))


def train(net, trainloader, epochs: int, lr: float, device) -> float:
    """Train the model on the training set; returns the mean training loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for x, y in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device) -> tuple[float, float]:
    """Validate the model on the test set; returns (loss, accuracy)."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for x, y in testloader:
            outputs = net(x.to(device))
            loss += criterion(outputs, y.to(device)).item()
            correct += (outputs.argmax(1) == y.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
