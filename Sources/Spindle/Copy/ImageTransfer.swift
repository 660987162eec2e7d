import Foundation
import Glibc

extension ThinPool {
    /// Copies the file at `path` (a raw disk image, of any size) into volume `volumeName`,
    /// sparse-aware: runs of zeros are discarded on the volume (which reads zeros there and
    /// allocates nothing for them), the rest is written. A missing volume is created at the file's
    /// size rounded up to 4 KiB, or `sizeBytes` when larger; an existing one must hold the file.
    /// The volume is flushed when the call returns. With `readOnly`, the volume is made read-only
    /// afterwards, and a new one made from a copy that records which volume it copies (an export)
    /// keeps that record, so deltas taken since that volume apply onto it
    /// (``importDelta(at:into:base:engine:progress:)``).
    /// - Parameter progress: bytes of the file done, and its size.
    /// - Throws: ``SpindleError`` when the file cannot be read or is larger than the volume, the
    ///   pool has no room, or a device fails.
    public func importImage(
        at path: String, into volumeName: String, sizeBytes: UInt64? = nil, readOnly: Bool = false,
        engine: IOEngine? = nil, progress: (@Sendable (BlockCopy.Progress) -> Void)? = nil
    ) async throws -> BlockCopy.Result {
        let fileBytes = try Self.regularFileBytes(path, operation: "import")
        // A file smaller than one block has only a tail.
        var image: FileDevice?
        if fileBytes >= 512 {
            image = try FileDevice.open(path: path, engine: engine, options: FileDevice.Options(readOnly: true))
        }
        do {
            let target: ThinVolume
            let exists = try await volumes().contains(where: { $0.name == volumeName })
            if exists {
                target = try await openVolume(name: volumeName)
                guard target.capacityBytes >= fileBytes else {
                    try? await target.close()
                    throw SpindleError(
                        .invalidArgument,
                        "the file is \(ByteSize.format(fileBytes)) but volume \(name)/\(volumeName) holds \(ByteSize.format(target.capacityBytes)); resize it first",
                        operation: "import", path: path)
                }
            } else {
                let wanted = max(sizeBytes ?? 0, (fileBytes + 4095) / 4096 * 4096)
                target = try await createVolume(name: volumeName, sizeBytes: max(wanted, 4096))
            }
            do {
                let result = try await copy(
                    image, fileBytes: fileBytes, path: path, into: target, engine: engine, progress: progress)
                try await target.close()
                try await image?.close()
                if readOnly {
                    // Only a volume that holds the file and nothing else is a copy of what the file copies.
                    if !exists, target.capacityBytes == fileBytes, let source = CopyRecord.copyOf(path) {
                        try await recordCopy(source, in: volumeName)
                    } else {
                        try await setReadOnly(name: volumeName, true)
                    }
                }
                return result
            } catch {
                try? await target.close()
                throw error
            }
        } catch {
            try? await image?.close()
            throw error
        }
    }

    private func copy(
        _ image: FileDevice?, fileBytes: UInt64, path: String, into target: ThinVolume, engine: IOEngine?,
        progress: (@Sendable (BlockCopy.Progress) -> Void)?
    ) async throws -> BlockCopy.Result {
        let unit = UInt64(max(image?.logicalBlockBytes ?? 1, target.logicalBlockBytes))
        let aligned = fileBytes / unit * unit
        var result = BlockCopy.Result(totalBytes: fileBytes)
        if let image, aligned > 0 {
            var options = BlockCopy.Options()
            options.length = aligned
            options.segmentBytes = Int(chunkBytes)
            options.pieceBytes = max(1 << 20, Int(chunkBytes))
            options.flush = false
            let copied = try await (engine ?? image.engine).copy(from: image, to: target, options: options) { done in
                progress?(BlockCopy.Progress(doneBytes: done.doneBytes, totalBytes: fileBytes))
            }
            result.writtenBytes = copied.writtenBytes
            result.skippedBytes = copied.skippedBytes
        }
        if fileBytes > aligned {
            // The tail, less than a block: read through the page cache, written padded with zeros.
            let tail = try Self.readBytes(path, from: aligned, count: Int(fileBytes - aligned))
            let block = target.logicalBlockBytes
            let buffer = AlignedBuffer(count: (tail.count + block - 1) / block * block)
            tail.withUnsafeBytes { buffer.copy(from: $0, at: 0) }
            if tail.allSatisfy({ $0 == 0 }) {
                try await target.discard(offset: aligned, length: UInt64(buffer.count))
                result.skippedBytes += UInt64(tail.count)
            } else {
                try await target.write(from: buffer, at: aligned)
                result.writtenBytes += UInt64(tail.count)
            }
            progress?(BlockCopy.Progress(doneBytes: fileBytes, totalBytes: fileBytes))
        }
        try await target.flush()
        return result
    }

    /// Copies volume `volumeName` to a new image file at `path` (an existing file there is
    /// replaced), sparse-aware: unmapped and all-zero chunks become holes. The file is flushed and
    /// closed when the call returns, and records which volume it copies (its `user.spindle.copy-of`
    /// attribute), so that ``exportChanges(of:since:toImageAt:engine:progress:)`` can later bring it
    /// up to date with a newer snapshot.
    /// - Parameter progress: bytes of the volume done, and its size.
    /// - Throws: ``SpindleError`` when there is no such volume, something that is not a regular file
    ///   is at `path`, or a device fails.
    public func exportVolume(
        _ volumeName: String, toImageAt path: String, engine: IOEngine? = nil,
        progress: (@Sendable (BlockCopy.Progress) -> Void)? = nil
    ) async throws -> BlockCopy.Result {
        let source = try await openVolume(name: volumeName)
        do {
            try Self.removeRegularFile(path, operation: "export")
            let target = try FileDevice.create(path: path, sizeBytes: source.capacityBytes, engine: engine)
            do {
                var options = BlockCopy.Options()
                options.zeroUnitBytes = Int(chunkBytes)
                options.segmentBytes = Int(chunkBytes)
                options.pieceBytes = max(1 << 20, Int(chunkBytes))
                options.targetReadsZeros = true
                let result = try await (engine ?? target.engine).copy(
                    from: source, to: target, options: options, progress: progress)
                try await target.close()
                try await source.close()
                if let info = try await volumes().first(where: { $0.id == source.id }) {
                    try await recordCopy(of: info, at: path)
                }
                return result
            } catch {
                try? await target.close()
                throw error
            }
        } catch {
            try? await source.close()
            throw error
        }
    }

    /// The size of the regular file at `path`.
    static func regularFileBytes(_ path: String, operation: String) throws(SpindleError) -> UInt64 {
        var info = stat()
        guard stat(path, &info) == 0 else {
            let error = errno
            var failure = SpindleError.system(error, operation: operation, path: path)
            if error == ENOENT { failure.message = "no such file" }
            throw failure
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw SpindleError(.invalidArgument, "not a regular file", operation: operation, path: path)
        }
        return UInt64(info.st_size)
    }

    /// Removes the regular file at `path`, if there is one; refuses anything else there.
    static func removeRegularFile(_ path: String, operation: String) throws(SpindleError) {
        var info = stat()
        guard stat(path, &info) == 0 else { return }  // nothing there: the create that follows says what else is wrong
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw SpindleError(.invalidArgument, "not a regular file", operation: operation, path: path)
        }
        try FileDevice.remove(path: path)
    }

    /// `count` bytes of the file at `path` from `offset`, through the page cache.
    static func readBytes(_ path: String, from offset: UInt64, count: Int) throws(SpindleError) -> [UInt8] {
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw SpindleError.system(errno, operation: "read", path: path) }
        defer { Glibc.close(descriptor) }
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes.withUnsafeMutableBytes {
                pread(descriptor, $0.baseAddress! + done, count - done, off_t(offset) + off_t(done))
            }
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else {
                if got == 0 {
                    throw SpindleError(
                        .shortTransfer, "the file ended early", operation: "read", path: path,
                        offset: offset + UInt64(done))
                }
                throw SpindleError.system(errno, operation: "read", path: path, offset: offset + UInt64(done))
            }
            done += got
        }
        return bytes
    }
}

extension FileDevice {
    /// Removes the image file at `path` (a file, never a folder).
    /// - Throws: ``SpindleError`` naming the path when it cannot be removed.
    public static func remove(path: String) throws(SpindleError) {
        guard unlink(path) == 0 else { throw SpindleError.system(errno, operation: "remove", path: path) }
    }
}
