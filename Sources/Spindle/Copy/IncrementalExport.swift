internal import CSpindleShims
import Glibc

/// The record an image file keeps of which volume it copies: the extended attribute
/// `user.spindle.copy-of` holding a ``VolumeIdentity`` as text, and `user.spindle.updating-to` while
/// changes are being applied (see docs/FORMATS.md). Set by ``ThinPool/exportVolume(_:toImageAt:engine:progress:)``
/// and ``ThinPool/exportChanges(of:since:toImageAt:engine:progress:)``, checked by the latter, so that
/// changes are never applied onto a copy of another volume.
enum CopyRecord {
    static let attribute = "user.spindle.copy-of"
    static let updatingAttribute = "user.spindle.updating-to"

    /// The attribute `name` of the file at `path`: nil when it has none or the file system keeps none.
    static func read(_ name: String, of path: String) -> String? {
        var value = [UInt8](repeating: 0, count: 512)
        let length = value.withUnsafeMutableBytes { spindle_get_attribute(path, name, $0.baseAddress, 512) }
        guard length >= 0 else { return nil }
        return String(decoding: value[0..<length], as: UTF8.self)
    }

    static func write(_ name: String, _ text: String, of path: String) throws(SpindleError) {
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ spindle_set_attribute(path, name, $0.baseAddress, UInt($0.count)) }) == 0 else {
            throw SpindleError.system(errno, operation: "record which volume the copy is of (\(name))", path: path)
        }
    }

    static func remove(_ name: String, of path: String) {
        _ = spindle_remove_attribute(path, name)
    }

    /// What the file at `path` is a copy of, when it says.
    static func copyOf(_ path: String) -> VolumeIdentity? {
        read(attribute, of: path).flatMap(VolumeIdentity.init(decoding:))
    }
}

extension ThinPool {
    /// Brings the image file at `path`, a copy of volume `baseName` (written by
    /// ``exportVolume(_:toImageAt:engine:progress:)`` or by this call), up to date with volume
    /// `volumeName`, writing only the ranges ``difference(from:to:)`` lists: data where the volume
    /// holds data, holes where it reads zeros; the file takes the volume's size. The file then
    /// records that it is a copy of `volumeName`, ready for the next call with `volumeName` as the
    /// base. Copying from a snapshot (a read-only one, `volumeName` included) gives a copy of a
    /// moment; the base must be read-only, since a writable one may have changed since the copy.
    ///
    /// An interrupted call leaves the file marked as being updated: only the same call again (the
    /// same base and volume) continues it, which is safe since it rewrites every changed range.
    /// - Parameter progress: bytes of the changed ranges done, and their total.
    /// - Throws: ``SpindleError/Code/invalidArgument`` when the file is not a copy of `baseName`
    ///   (naming what it is a copy of), `baseName` is writable, or an update to another volume was
    ///   interrupted; ``SpindleError/Code/notFound`` for a volume or file that does not exist;
    ///   what the devices throw.
    public func exportChanges(
        of volumeName: String, since baseName: String, toImageAt path: String, engine: IOEngine? = nil,
        progress: (@Sendable (BlockCopy.Progress) -> Void)? = nil
    ) async throws -> BlockCopy.Result {
        let volumes = try await self.volumes()
        let operation = "export changes"
        guard let base = volumes.first(where: { $0.name == baseName }) else {
            throw SpindleError(.notFound, "pool \(name) has no volume named '\(baseName)'", operation: operation)
        }
        guard let target = volumes.first(where: { $0.name == volumeName }) else {
            throw SpindleError(.notFound, "pool \(name) has no volume named '\(volumeName)'", operation: operation)
        }
        guard let baseIdentity = try await contentIdentity(of: base.name) else {
            throw SpindleError(
                .invalidArgument,
                "\(name)/\(baseName) is writable, so it may have changed since it was copied; take copies of read-only snapshots and give one as the base",
                operation: operation, path: path)
        }
        _ = try Self.regularFileBytes(path, operation: operation)
        let targetIdentity = try await contentIdentity(of: target.name) ?? VolumeIdentity(pool: self, volume: target)
        let recorded = CopyRecord.read(CopyRecord.attribute, of: path)
        guard let recorded, let copyOf = VolumeIdentity(decoding: recorded), copyOf.sameVolume(as: baseIdentity) else {
            let what =
                recorded.map { VolumeIdentity(decoding: $0).map { "a copy of \($0)" } ?? "an unreadable copy record" }
                ?? "no record of what it copies (export \(name)/\(baseName) to it first)"
            throw SpindleError(
                .invalidArgument, "the file is not a copy of \(name)/\(baseName): it holds \(what)",
                operation: operation, path: path)
        }
        if let updating = CopyRecord.read(CopyRecord.updatingAttribute, of: path),
            VolumeIdentity(decoding: updating).map({ !$0.sameVolume(as: targetIdentity) }) ?? true
        {
            throw SpindleError(
                .invalidArgument,
                "an update of this copy to \(VolumeIdentity(decoding: updating)?.name ?? "another volume") was interrupted; run that export again first",
                operation: operation, path: path)
        }
        let difference = try await difference(from: baseName, to: volumeName)
        try CopyRecord.write(CopyRecord.updatingAttribute, targetIdentity.encoded, of: path)
        guard truncate(path, off_t(difference.sizeBytes)) == 0 else {
            throw SpindleError.system(errno, operation: "resize the copy", path: path)
        }
        let source = try await openVolume(name: volumeName)
        var result = BlockCopy.Result()
        do {
            let file = try FileDevice.open(path: path, engine: engine)
            do {
                let total = difference.changedBytes
                var done: UInt64 = 0
                for range in difference.ranges {
                    var options = BlockCopy.Options()
                    options.sourceOffset = range.offset
                    options.targetOffset = range.offset
                    options.length = range.length
                    options.zeroUnitBytes = Int(chunkBytes)
                    options.segmentBytes = Int(chunkBytes)
                    options.pieceBytes = max(1 << 20, Int(chunkBytes))
                    options.flush = false
                    let before = done
                    let copied = try await (engine ?? file.engine).copy(from: source, to: file, options: options) {
                        progress?(BlockCopy.Progress(doneBytes: before + $0.doneBytes, totalBytes: total))
                    }
                    result.totalBytes += copied.totalBytes
                    result.writtenBytes += copied.writtenBytes
                    result.skippedBytes += copied.skippedBytes
                    done += range.length
                }
                try await file.flush()
                try await file.close()
            } catch {
                try? await file.close()
                throw error
            }
            try await source.close()
        } catch {
            try? await source.close()
            throw error
        }
        try CopyRecord.write(CopyRecord.attribute, targetIdentity.encoded, of: path)
        CopyRecord.remove(CopyRecord.updatingAttribute, of: path)
        try Self.syncFile(path)
        return result
    }

    /// Records on a new full copy of a volume which volume it copies (for a volume restored from a
    /// copy, the volume that copy was of). A file system without extended attributes keeps no
    /// record; such a copy cannot take changes later.
    func recordCopy(of volume: VolumeInfo, at path: String) async throws {
        let identity = try await contentIdentity(of: volume.name) ?? VolumeIdentity(pool: self, volume: volume)
        CopyRecord.remove(CopyRecord.updatingAttribute, of: path)
        try? CopyRecord.write(CopyRecord.attribute, identity.encoded, of: path)
        try? Self.syncFile(path)
    }

    /// Makes the file's data and attributes durable.
    static func syncFile(_ path: String) throws(SpindleError) {
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw SpindleError.system(errno, operation: "sync", path: path) }
        defer { Glibc.close(descriptor) }
        guard fsync(descriptor) == 0 else { throw SpindleError.system(errno, operation: "sync", path: path) }
    }
}
