"""flowerapp: a Flower ServerApp, as in Flower's quickstart-pytorch example."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedledger.chain import OnChainAudit

from flowerapp.task import Net

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    torch.manual_seed(0)
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy, every round recorded on the ledger
    strategy = OnChainAudit.from_context(FedAvg(fraction_train=fraction_train), context)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(grid=grid, initial_arrays=arrays, train_config=ConfigRecord({"lr": lr}),
                            num_rounds=num_rounds)
    print("\nfinal federated evaluation:", result.evaluate_metrics_clientapp.get(num_rounds))
