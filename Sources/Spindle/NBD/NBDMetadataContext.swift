/// A metadata context an export offers to `NBD_CMD_BLOCK_STATUS`.
///
/// - `base:allocation` (every export): holes that read as zeros (flags hole and zero) and data
///   (flags 0). A thin volume's unmapped chunks and an image file's holes are holes; an array is
///   all data.
/// - `qemu:dirty-bitmap:NAME` (thin volumes, one per other volume of the pool): the ranges that
///   changed since volume NAME, usually a snapshot of the exported volume (flag dirty), and the
///   rest (flags 0). qemu's name for changed-block tracking, so backup tools that read qemu's dirty
///   bitmaps through libnbd read Spindle's unchanged.
enum NBDMetadataContext: Equatable, Sendable {
    case allocation
    case changedSince(String)

    static let allocationName = "base:allocation"
    static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

    var name: String {
        switch self {
        case .allocation: return Self.allocationName
        case .changedSince(let baseline): return Self.dirtyBitmapPrefix + baseline
        }
    }

    /// The contexts `device` offers. A baseline list that cannot be read offers allocation alone.
    static func available(for device: any BlockDevice) async -> [NBDMetadataContext] {
        var contexts: [NBDMetadataContext] = [.allocation]
        if let tracking = device as? any ChangeTrackingDevice, let baselines = try? await tracking.changeBaselines() {
            contexts += baselines.sorted().map { .changedSince($0) }
        }
        return contexts
    }

    /// The contexts among `available` that `query` names, or nil for a query the protocol calls
    /// malformed (no namespace). Listing (`NBD_OPT_LIST_META_CONTEXT`) takes the wildcards `base:`,
    /// `qemu:` and `qemu:dirty-bitmap:`; selecting (`NBD_OPT_SET_META_CONTEXT`) takes whole names
    /// only. Unknown namespaces and names select nothing, as the protocol requires.
    static func matching(_ query: String, in available: [NBDMetadataContext], listing: Bool) -> [NBDMetadataContext]? {
        guard let colon = query.firstIndex(of: ":"), colon != query.startIndex else { return nil }
        if listing && (query == "base:" || query == "qemu:" || query == dirtyBitmapPrefix) {
            return available.filter { $0.name.hasPrefix(query) }
        }
        return available.filter { $0.name == query }
    }

    /// One status descriptor: a length and its flags.
    struct Extent: Equatable {
        var length: UInt32
        var flags: UInt32
    }

    /// The descriptors for `length` bytes at `offset` of `device` (inside it): consecutive, with
    /// flags alternating, covering the range, or the first `limit` of them.
    func extents(of device: any BlockDevice, offset: UInt64, length: UInt32, limit: Int) async throws -> [Extent] {
        let range = offset..<(offset + UInt64(length))
        switch self {
        case .allocation:
            guard let sparse = device as? any SparseBlockDevice else { return [Extent(length: length, flags: 0)] }
            let data = try await sparse.dataRanges(in: range)
            return Self.extents(
                covering: range, marked: data, markedFlags: 0,
                otherFlags: NBDProtocol.stateHole | NBDProtocol.stateZero, limit: limit)
        case .changedSince(let baseline):
            guard let tracking = device as? any ChangeTrackingDevice else {
                return [Extent(length: length, flags: NBDProtocol.stateDirty)]
            }
            let changed = try await tracking.changedRanges(since: baseline, in: range)
            return Self.extents(
                covering: range, marked: changed, markedFlags: NBDProtocol.stateDirty, otherFlags: 0, limit: limit)
        }
    }

    /// Descriptors covering `range`: `markedFlags` over `marked` (ordered ranges inside `range`),
    /// `otherFlags` elsewhere; touching ranges with the same flags are one descriptor. At most
    /// `limit` descriptors (the rest of the range is left for the client's next request).
    static func extents(
        covering range: Range<UInt64>, marked: [Range<UInt64>], markedFlags: UInt32, otherFlags: UInt32, limit: Int
    ) -> [Extent] {
        var result: [Extent] = []
        var position = range.lowerBound
        func add(_ end: UInt64, _ flags: UInt32) {
            guard end > position else { return }
            if let last = result.last, last.flags == flags {
                result[result.count - 1].length += UInt32(end - position)
            } else {
                result.append(Extent(length: UInt32(end - position), flags: flags))
            }
            position = end
        }
        for piece in marked {
            let lower = max(piece.lowerBound, position)
            let upper = min(piece.upperBound, range.upperBound)
            guard lower < upper else { continue }
            add(lower, otherFlags)
            add(upper, markedFlags)
            if result.count > limit { break }
        }
        add(range.upperBound, otherFlags)
        return Array(result.prefix(limit))
    }

    /// A `NBD_REPLY_TYPE_BLOCK_STATUS` payload: the context's id and its descriptors.
    static func blockStatusPayload(id: UInt32, extents: [Extent]) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(4 + extents.count * 8)
        NBDProtocol.append(id, to: &bytes)
        for extent in extents {
            NBDProtocol.append(extent.length, to: &bytes)
            NBDProtocol.append(extent.flags, to: &bytes)
        }
        return bytes
    }
}
