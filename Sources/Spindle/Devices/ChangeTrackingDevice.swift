/// A block device that knows which of its ranges changed since an earlier state it keeps, named by
/// a baseline: a thin volume knows what differs from a snapshot of it (or any other volume of its
/// pool). What an incremental backup copies, and what ``NBDServer`` offers as `qemu:dirty-bitmap:`
/// metadata contexts.
public protocol ChangeTrackingDevice: BlockDevice {
    /// The baselines changes can be asked against, by name.
    func changeBaselines() async throws -> [String]
    /// The parts of `range` that may read other than in `baseline`, in order and inside `range`;
    /// every other byte reads as it did there. Errs only toward "changed".
    /// - Throws: ``SpindleError/Code/notFound`` for a baseline that does not exist.
    func changedRanges(since baseline: String, in range: Range<UInt64>) async throws -> [Range<UInt64>]
}
