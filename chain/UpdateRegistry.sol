// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title UpdateRegistry: an append-only audit trail of federated-learning rounds.
/// @notice The owner (the aggregator) opens rounds in order, records every client update of a
/// round in one batch transaction (client address, SHA-256 of the update, number of examples,
/// the client's EIP-191 signature) and commits, in one transaction, the round's aggregate hash
/// and the hash of the round document (the off-chain round.json: accepted and refused replies,
/// the trust decision, the global adapter the round started from). One registry can hold many
/// runs (keyed by the Flower run id).
contract UpdateRegistry {
    struct Round {
        uint32 count;        // records in this round
        bool open;
        bool committed;
        bytes32 aggregate;   // hash of the aggregate (0 until committed)
        bytes32 digest;      // running keccak over the ordered records (client, hash, numExamples)
        bytes32 document;    // SHA-256 of the round document (0 until committed)
    }

    address public immutable owner;
    mapping(uint256 => uint256) public currentRound;                       // runId => last opened round
    mapping(uint256 => mapping(uint256 => Round)) private rounds;          // runId => round => Round
    mapping(uint256 => mapping(uint256 => mapping(address => bytes32))) private hashes;

    event RoundOpened(uint256 indexed runId, uint256 indexed round);
    event UpdateRecorded(
        uint256 indexed runId,
        uint256 indexed round,
        address indexed client,
        uint256 index,
        bytes32 updateHash,
        uint64 numExamples,
        bytes signature
    );
    event AggregateCommitted(
        uint256 indexed runId,
        uint256 indexed round,
        bytes32 aggregateHash,
        uint256 numRecords,
        bytes32 recordsDigest,
        bytes32 documentHash
    );

    error NotOwner();
    error RoundOutOfOrder(uint256 expected, uint256 got);
    error RoundNotOpen(uint256 round);
    error RoundCommitted(uint256 round);
    error DuplicateRecord(address client);
    error LengthMismatch();
    error ZeroHash();

    constructor() {
        owner = msg.sender;
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    /// Open `round` of `runId`; rounds open strictly in order 1, 2, 3, ...
    function openRound(uint256 runId, uint256 round) external onlyOwner {
        uint256 expected = currentRound[runId] + 1;
        if (round != expected) revert RoundOutOfOrder(expected, round);
        currentRound[runId] = round;
        rounds[runId][round].open = true;
        emit RoundOpened(runId, round);
    }

    /// Record a batch of client updates for the current, not yet committed round.
    function recordUpdates(
        uint256 runId,
        uint256 round,
        address[] calldata clients,
        bytes32[] calldata updateHashes,
        uint64[] calldata numExamples,
        bytes[] calldata signatures
    ) external onlyOwner {
        uint256 n = clients.length;
        if (updateHashes.length != n || numExamples.length != n || signatures.length != n) revert LengthMismatch();
        if (round != currentRound[runId]) revert RoundOutOfOrder(currentRound[runId], round);
        Round storage r = rounds[runId][round];
        if (!r.open) revert RoundNotOpen(round);
        if (r.committed) revert RoundCommitted(round);
        bytes32 digest = r.digest;
        uint256 index = r.count;
        for (uint256 i = 0; i < n; i++) {
            digest = _record(runId, round, index + i, digest, clients[i], updateHashes[i], numExamples[i], signatures[i]);
        }
        index += n;
        r.digest = digest;
        r.count = uint32(index);
    }

    function _record(
        uint256 runId,
        uint256 round,
        uint256 index,
        bytes32 digest,
        address client,
        bytes32 h,
        uint64 numExamples,
        bytes calldata signature
    ) private returns (bytes32) {
        if (h == bytes32(0)) revert ZeroHash();
        if (hashes[runId][round][client] != bytes32(0)) revert DuplicateRecord(client);
        hashes[runId][round][client] = h;
        emit UpdateRecorded(runId, round, client, index, h, numExamples, signature);
        return keccak256(abi.encode(digest, client, h, numExamples));
    }

    /// Commit the round: the aggregate hash (0 when the round aggregated nothing) and the hash of
    /// the round document, in one transaction; closes the round for records.
    function commitAggregate(uint256 runId, uint256 round, bytes32 aggregateHash, bytes32 documentHash)
        external
        onlyOwner
    {
        if (documentHash == bytes32(0)) revert ZeroHash();
        if (round != currentRound[runId]) revert RoundOutOfOrder(currentRound[runId], round);
        Round storage r = rounds[runId][round];
        if (!r.open) revert RoundNotOpen(round);
        if (r.committed) revert RoundCommitted(round);
        r.committed = true;
        r.aggregate = aggregateHash;
        r.document = documentHash;
        emit AggregateCommitted(runId, round, aggregateHash, r.count, r.digest, documentHash);
    }

    /// Read a round: number of records, whether open and committed, aggregate hash, records
    /// digest, round-document hash.
    function getRound(uint256 runId, uint256 round)
        external
        view
        returns (
            uint256 count,
            bool open,
            bool committed,
            bytes32 aggregateHash,
            bytes32 recordsDigest,
            bytes32 documentHash
        )
    {
        Round storage r = rounds[runId][round];
        return (r.count, r.open, r.committed, r.aggregate, r.digest, r.document);
    }

    /// Read one client's recorded update hash in a round (0 when none).
    function updateHashOf(uint256 runId, uint256 round, address client) external view returns (bytes32) {
        return hashes[runId][round][client];
    }
}
