// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title UpdateRegistry: an append-only audit trail of federated-learning runs, with two roles.
/// @notice The **admin** deploys the registry, names the **aggregator** (a different key), and
/// enrols / revokes the client signer addresses that belong to the federation (events). The
/// aggregator opens a run with the hash of its run document (rule, parameters, trust settings,
/// layout, enrolled set, admin and aggregator) and the hash of the initial global model; opens
/// rounds strictly in order, each after the previous one is committed and starting from the
/// last committed aggregate (the registry fills in the round's global hash itself); records the
/// round's client updates in one batch (each signer must be enrolled); and commits the round's
/// aggregate hash with the hash of the round document. Clients sign EIP-712 typed commitments
/// `Update(runId, round, globalHash, updateHash, numExamples)` under this registry's domain
/// (chain id, address): a commitment cannot be replayed into another registry or chain. An
/// enrolled client whose update is missing from a committed round posts its signed commitment
/// with `contest`; the registry checks the signature with ecrecover and keeps the proof (event).
contract UpdateRegistry {
    struct Run {
        bytes32 runHash;        // SHA-256 of the run document (run.json)
        bytes32 initialGlobal;  // hash of the global model round 1 starts from
        bytes32 currentGlobal;  // hash of the global model the next round starts from
        uint64 openedAt;        // block of openRun
        uint32 currentRound;    // last opened round
    }

    struct Round {
        uint32 count;        // records in this round
        bool open;
        bool committed;
        bytes32 aggregate;   // hash of the aggregate (0 until committed, or when nothing was aggregated)
        bytes32 digest;      // running keccak over the ordered records (client, hash, numExamples)
        bytes32 document;    // SHA-256 of the round document (0 until committed)
    }

    bytes32 public constant UPDATE_TYPEHASH =
        keccak256("Update(uint256 runId,uint256 round,bytes32 globalHash,bytes32 updateHash,uint64 numExamples)");
    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    uint256 private constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    address public immutable admin;
    address public immutable aggregator;
    uint256 public immutable deployBlock;
    bytes32 public immutable DOMAIN_SEPARATOR;

    mapping(address => bool) public enrolled;
    mapping(uint256 => Run) private runs;                                   // runId => Run
    mapping(uint256 => mapping(uint256 => Round)) private rounds;           // runId => round => Round
    mapping(uint256 => mapping(uint256 => mapping(address => bytes32))) private hashes;
    mapping(uint256 => mapping(uint256 => mapping(address => bool))) public contested;

    event Enrolled(address indexed signer);
    event Revoked(address indexed signer);
    event RunOpened(uint256 indexed runId, bytes32 runHash, bytes32 initialGlobal);
    event RoundOpened(uint256 indexed runId, uint256 indexed round, bytes32 globalHash);
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
    event Contested(
        uint256 indexed runId,
        uint256 indexed round,
        address indexed client,
        bytes32 globalHash,
        bytes32 updateHash,
        uint64 numExamples,
        bytes signature,
        address sender
    );

    error NotAdmin();
    error NotAggregator();
    error AdminIsAggregator();
    error ZeroAddress();
    error RunAlreadyOpen(uint256 runId);
    error RunNotOpen(uint256 runId);
    error RoundOutOfOrder(uint256 expected, uint256 got);
    error RoundNotOpen(uint256 round);
    error RoundCommitted(uint256 round);
    error RoundNotCommitted(uint256 round);
    error DuplicateRecord(address client);
    error NotEnrolled(address signer);
    error LengthMismatch();
    error ZeroHash();
    error BadSignature();
    error AlreadyRecorded(address client);
    error AlreadyContested(address client);

    constructor(address aggregator_) {
        if (aggregator_ == address(0)) revert ZeroAddress();
        if (aggregator_ == msg.sender) revert AdminIsAggregator();
        admin = msg.sender;
        aggregator = aggregator_;
        deployBlock = block.number;
        DOMAIN_SEPARATOR = keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("fedledger"), keccak256("2"), block.chainid, address(this))
        );
    }

    modifier onlyAdmin() {
        if (msg.sender != admin) revert NotAdmin();
        _;
    }

    modifier onlyAggregator() {
        if (msg.sender != aggregator) revert NotAggregator();
        _;
    }

    // ------------------------------------------------------------------ the admin: who belongs
    /// Enrol client signer addresses (already enrolled ones are skipped).
    function enrol(address[] calldata signers) external onlyAdmin {
        for (uint256 i = 0; i < signers.length; i++) {
            address s = signers[i];
            if (s == address(0)) revert ZeroAddress();
            if (!enrolled[s]) {
                enrolled[s] = true;
                emit Enrolled(s);
            }
        }
    }

    /// Revoke client signer addresses (ones not enrolled are skipped).
    function revoke(address[] calldata signers) external onlyAdmin {
        for (uint256 i = 0; i < signers.length; i++) {
            address s = signers[i];
            if (enrolled[s]) {
                enrolled[s] = false;
                emit Revoked(s);
            }
        }
    }

    // ------------------------------------------------------------------ the aggregator: runs and rounds
    /// Open `runId` with the hash of its run document and of the initial global model.
    function openRun(uint256 runId, bytes32 runHash, bytes32 initialGlobal) external onlyAggregator {
        if (runHash == bytes32(0) || initialGlobal == bytes32(0)) revert ZeroHash();
        Run storage run = runs[runId];
        if (run.openedAt != 0) revert RunAlreadyOpen(runId);
        run.runHash = runHash;
        run.initialGlobal = initialGlobal;
        run.currentGlobal = initialGlobal;
        run.openedAt = uint64(block.number);
        emit RunOpened(runId, runHash, initialGlobal);
    }

    /// Open `round` of `runId`: rounds open strictly in order 1, 2, 3, ..., each after the previous
    /// one is committed; the round starts from the run's current global model.
    function openRound(uint256 runId, uint256 round) external onlyAggregator {
        Run storage run = runs[runId];
        if (run.openedAt == 0) revert RunNotOpen(runId);
        uint256 expected = uint256(run.currentRound) + 1;
        if (round != expected) revert RoundOutOfOrder(expected, round);
        if (round > 1 && !rounds[runId][round - 1].committed) revert RoundNotCommitted(round - 1);
        run.currentRound = uint32(round);
        rounds[runId][round].open = true;
        emit RoundOpened(runId, round, run.currentGlobal);
    }

    /// Record a batch of client updates for the current, not yet committed round; every signer
    /// must be enrolled.
    function recordUpdates(
        uint256 runId,
        uint256 round,
        address[] calldata clients,
        bytes32[] calldata updateHashes,
        uint64[] calldata numExamples,
        bytes[] calldata signatures
    ) external onlyAggregator {
        uint256 n = clients.length;
        if (updateHashes.length != n || numExamples.length != n || signatures.length != n) revert LengthMismatch();
        uint256 current = runs[runId].currentRound;
        if (round != current) revert RoundOutOfOrder(current, round);
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
        if (!enrolled[client]) revert NotEnrolled(client);
        if (hashes[runId][round][client] != bytes32(0)) revert DuplicateRecord(client);
        hashes[runId][round][client] = h;
        emit UpdateRecorded(runId, round, client, index, h, numExamples, signature);
        return keccak256(abi.encode(digest, client, h, numExamples));
    }

    /// Commit the round: the aggregate hash (0 when the round aggregated nothing: the global model
    /// stays as it was) and the hash of the round document, in one transaction; closes the round.
    function commitAggregate(uint256 runId, uint256 round, bytes32 aggregateHash, bytes32 documentHash)
        external
        onlyAggregator
    {
        if (documentHash == bytes32(0)) revert ZeroHash();
        Run storage run = runs[runId];
        if (round != run.currentRound) revert RoundOutOfOrder(run.currentRound, round);
        Round storage r = rounds[runId][round];
        if (!r.open) revert RoundNotOpen(round);
        if (r.committed) revert RoundCommitted(round);
        r.committed = true;
        r.aggregate = aggregateHash;
        r.document = documentHash;
        if (aggregateHash != bytes32(0)) run.currentGlobal = aggregateHash;
        emit AggregateCommitted(runId, round, aggregateHash, r.count, r.digest, documentHash);
    }

    // ------------------------------------------------------------------ a client left out
    /// An enrolled client whose signed update is not recorded in a committed round posts its
    /// signed commitment; the registry recovers the signer (who must be enrolled) and keeps it.
    function contest(
        uint256 runId,
        uint256 round,
        bytes32 globalHash,
        bytes32 updateHash,
        uint64 numExamples,
        bytes calldata signature
    ) external {
        if (!enrolled[msg.sender]) revert NotEnrolled(msg.sender);
        if (!rounds[runId][round].committed) revert RoundNotCommitted(round);
        address signer = _signer(updateDigest(runId, round, globalHash, updateHash, numExamples), signature);
        if (!enrolled[signer]) revert NotEnrolled(signer);
        if (hashes[runId][round][signer] != bytes32(0)) revert AlreadyRecorded(signer);
        if (contested[runId][round][signer]) revert AlreadyContested(signer);
        contested[runId][round][signer] = true;
        emit Contested(runId, round, signer, globalHash, updateHash, numExamples, signature, msg.sender);
    }

    /// The EIP-712 digest a client signs for one update.
    function updateDigest(uint256 runId, uint256 round, bytes32 globalHash, bytes32 updateHash, uint64 numExamples)
        public
        view
        returns (bytes32)
    {
        bytes32 structHash = keccak256(abi.encode(UPDATE_TYPEHASH, runId, round, globalHash, updateHash, numExamples));
        return keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR, structHash));
    }

    function _signer(bytes32 digest, bytes calldata signature) private pure returns (address) {
        if (signature.length != 65) revert BadSignature();
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (v < 27) v += 27;
        if (uint256(s) > HALF_N || (v != 27 && v != 28)) revert BadSignature();
        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert BadSignature();
        return signer;
    }

    // ------------------------------------------------------------------ reads
    /// A run: run-document hash, initial and current global model hashes, block of openRun
    /// (0: not open), last opened round.
    function getRun(uint256 runId)
        external
        view
        returns (bytes32 runHash, bytes32 initialGlobal, bytes32 currentGlobal, uint256 openedAt, uint256 currentRound)
    {
        Run storage run = runs[runId];
        return (run.runHash, run.initialGlobal, run.currentGlobal, run.openedAt, run.currentRound);
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
