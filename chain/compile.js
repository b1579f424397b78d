// Compile chain/UpdateRegistry.sol with solc-js (pinned by scripts/install_chain_tools.sh) and
// print {"contractName","compiler","evmVersion","abi","bytecode","deployedBytecode","immutableReferences"}
// as JSON (immutableReferences: byte ranges of the deployed code that hold immutables, which an
// auditor masks when comparing a registry's code with this artifact).
// Usage: node chain/compile.js [path/to/node_modules/solc]
const fs = require("fs");
const path = require("path");
const solcPath = process.argv[2] || path.join(__dirname, "..", ".tools", "node_modules", "solc");
const solc = require(solcPath);
const src = fs.readFileSync(path.join(__dirname, "UpdateRegistry.sol"), "utf8");
const input = {
  language: "Solidity",
  sources: { "UpdateRegistry.sol": { content: src } },
  settings: {
    evmVersion: "cancun",
    viaIR: true,
    optimizer: { enabled: true, runs: 200 },
    metadata: { bytecodeHash: "none" },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object",
                                     "evm.deployedBytecode.immutableReferences"] } },
  },
};
const out = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (out.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const c = out.contracts["UpdateRegistry.sol"]["UpdateRegistry"];
process.stdout.write(JSON.stringify({
  contractName: "UpdateRegistry",
  compiler: "solc-js " + solc.version(),
  evmVersion: "cancun",
  viaIR: true,
  optimizer: { enabled: true, runs: 200 },
  abi: c.abi,
  bytecode: "0x" + c.evm.bytecode.object,
  deployedBytecode: "0x" + c.evm.deployedBytecode.object,
  immutableReferences: Object.values(c.evm.deployedBytecode.immutableReferences || {}).flat()
    .map((r) => [r.start, r.length]).sort((a, b) => a[0] - b[0]),
}, null, 1) + "\n");
