import Glibc

extension ThinPool {
    /// Writes the changes of volume `volumeName` since read-only volume `baseName` to a delta file
    /// at `path` (an existing file there is replaced; the format is ``VolumeDelta``): the ranges
    /// ``difference(from:to:)`` lists, as data where the volume holds data and as zeros elsewhere.
    /// ``importDelta(at:into:base:engine:progress:)`` applies it onto a copy of `baseName`, here or
    /// in another pool. The header goes last, so a file cut short is refused.
    /// - Parameter progress: bytes of the changed ranges done, and their total.
    /// - Throws: ``SpindleError/Code/invalidArgument`` when `baseName` is writable,
    ///   ``SpindleError/Code/notFound`` for a missing volume, what the devices throw.
    public func exportDelta(
        of volumeName: String, since baseName: String, toFileAt path: String, engine: IOEngine? = nil,
        progress: (@Sendable (BlockCopy.Progress) -> Void)? = nil
    ) async throws -> BlockCopy.Result {
        let operation = "export delta"
        guard let base = try await contentIdentity(of: baseName) else {
            throw SpindleError(
                .invalidArgument,
                "\(name)/\(baseName) is writable, so copies of it may differ from it now; take deltas since read-only snapshots",
                operation: operation, path: path)
        }
        // A volume restored from a copy hands on what it is a copy of.
        var target = try await contentIdentity(of: volumeName)
        if target == nil { target = try await identity(of: volumeName) }
        let difference = try await difference(from: baseName, to: volumeName)
        let source = try await openVolume(name: volumeName)
        do {
            var delta = VolumeDelta(
                base: base, target: target!, targetBytes: difference.sizeBytes, chunkBytes: chunkBytes, extents: [])
            for range in difference.ranges {
                var position = range.offset
                for data in try await source.dataRanges(in: range.range) {
                    if data.lowerBound > position {
                        delta.extents.append(.init(offset: position, length: data.lowerBound - position, kind: .zeros))
                    }
                    var start = data.lowerBound
                    while start < data.upperBound {
                        let length = min(VolumeDelta.maximumDataExtentBytes, data.upperBound - start)
                        delta.extents.append(.init(offset: start, length: length, kind: .data))
                        start += length
                    }
                    position = data.upperBound
                }
                if position < range.range.upperBound {
                    delta.extents.append(
                        .init(offset: position, length: range.range.upperBound - position, kind: .zeros))
                }
            }
            delta.placeData()
            try Self.removeRegularFile(path, operation: operation)
            let file = try FileDevice.create(path: path, sizeBytes: delta.fileBytes, engine: engine)
            let result: BlockCopy.Result
            do {
                result = try await writeDelta(&delta, from: source, to: file, total: difference.changedBytes, progress)
                try await file.close()
            } catch {
                try? await file.close()
                try? FileDevice.remove(path: path)
                throw error
            }
            try await source.close()
            return result
        } catch {
            try? await source.close()
            throw error
        }
    }

    /// The data extents (each checksummed), then the table, a flush, and the header.
    private func writeDelta(
        _ delta: inout VolumeDelta, from source: ThinVolume, to file: FileDevice, total: UInt64,
        _ progress: (@Sendable (BlockCopy.Progress) -> Void)?
    ) async throws -> BlockCopy.Result {
        var result = BlockCopy.Result()
        let buffer = AlignedBuffer(count: Int(VolumeDelta.maximumDataExtentBytes), zeroed: false)
        for index in delta.extents.indices {
            let extent = delta.extents[index]
            if extent.kind == .data {
                let length = Int(extent.length)
                try await source.read(into: buffer, range: 0..<length, at: extent.offset)
                delta.extents[index].checksum = withExtendedLifetime(buffer) {
                    CRC32C.checksum(UnsafeRawBufferPointer(buffer.slice(offset: 0, length: length)))
                }
                try await file.write(from: buffer, range: 0..<length, at: extent.position)
                result.writtenBytes += extent.length
            } else {
                result.skippedBytes += extent.length
            }
            result.totalBytes += extent.length
            progress?(BlockCopy.Progress(doneBytes: result.totalBytes, totalBytes: total))
        }
        let (header, table) = delta.encoded()
        if !table.isEmpty {
            let tableBuffer = AlignedBuffer(count: table.count)
            table.withUnsafeBytes { tableBuffer.copy(from: $0, at: 0) }
            try await file.write(from: tableBuffer, at: UInt64(VolumeDelta.blockBytes))
        }
        try await file.flush()
        let headerBuffer = AlignedBuffer(count: VolumeDelta.blockBytes)
        header.withUnsafeBytes { headerBuffer.copy(from: $0, at: 0) }
        try await file.write(from: headerBuffer, at: 0, fua: true)
        try await file.flush()
        return result
    }

    /// Creates read-only volume `volumeName` from the delta file at `path` applied onto read-only
    /// volume `baseName`, which must hold a copy of the delta's base (the base itself, or a volume
    /// restored from a copy of it: see ``contentIdentity(of:)``). The new volume is a snapshot of
    /// `baseName` with the delta's data written and its zeros discarded, at the delta's size, and
    /// records that it holds a copy of the delta's target, so the next delta in a chain applies onto
    /// it. Every data extent's checksum is checked before it is written. On any failure the new
    /// volume is deleted: nothing half applied remains.
    /// - Parameter progress: bytes of the delta's extents done, and their total.
    /// - Throws: ``SpindleError/Code/corrupted`` for a damaged delta, ``SpindleError/Code/invalidArgument``
    ///   when `baseName` does not hold the delta's base (naming both), ``SpindleError/Code/alreadyExists``
    ///   when `volumeName` exists, what the devices throw.
    public func importDelta(
        at path: String, into volumeName: String, base baseName: String, engine: IOEngine? = nil,
        progress: (@Sendable (BlockCopy.Progress) -> Void)? = nil
    ) async throws -> BlockCopy.Result {
        let operation = "import delta"
        let fileBytes = try Self.regularFileBytes(path, operation: operation)
        let delta: VolumeDelta
        do {
            let header = try Self.readBytes(path, from: 0, count: min(Int(fileBytes), VolumeDelta.blockBytes))
            guard header.count == VolumeDelta.blockBytes else { throw VolumeDelta.Problem.notADelta }
            let table = try Self.readBytes(
                path, from: UInt64(VolumeDelta.blockBytes), count: try VolumeDelta.tableBytes(header: header))
            delta = try VolumeDelta.decode(header: header, table: table, fileBytes: fileBytes)
        } catch let problem as VolumeDelta.Problem {
            throw SpindleError(.corrupted, problem.description, operation: operation, path: path, cause: problem)
        } catch let error as SpindleError where error.code == .shortTransfer {
            throw SpindleError(
                .corrupted, VolumeDelta.Problem.invalid("the file is cut short").description, operation: operation,
                path: path, cause: error)
        }
        let holds = try await contentIdentity(of: baseName)
        guard let holds, holds.sameVolume(as: delta.base) else {
            throw SpindleError(
                .invalidArgument,
                "the delta applies onto a copy of \(delta.base), but \(name)/\(baseName) \(holds.map { "holds a copy of \($0)" } ?? "is writable")",
                operation: operation, path: path)
        }
        try await snapshot(volume: baseName, name: volumeName)
        do {
            if try await volumes().first(where: { $0.name == volumeName })?.sizeBytes != delta.targetBytes {
                try await resizeVolume(name: volumeName, sizeBytes: delta.targetBytes)
            }
            let result = try await applyDelta(delta, from: path, into: volumeName, engine: engine, progress: progress)
            try await recordCopy(delta.target, in: volumeName)
            return result
        } catch {
            try? await deleteVolume(name: volumeName)
            throw error
        }
    }

    private func applyDelta(
        _ delta: VolumeDelta, from path: String, into volumeName: String, engine: IOEngine?,
        progress: (@Sendable (BlockCopy.Progress) -> Void)?
    ) async throws -> BlockCopy.Result {
        let file = try FileDevice.open(path: path, engine: engine, options: FileDevice.Options(readOnly: true))
        let target = try await openVolume(name: volumeName)
        do {
            var result = BlockCopy.Result()
            let total = delta.extents.reduce(0) { $0 + $1.length }
            let buffer = AlignedBuffer(count: Int(VolumeDelta.maximumDataExtentBytes), zeroed: false)
            for extent in delta.extents {
                if extent.kind == .data {
                    let length = Int(extent.length)
                    try await file.read(into: buffer, range: 0..<length, at: extent.position)
                    let checksum = withExtendedLifetime(buffer) {
                        CRC32C.checksum(UnsafeRawBufferPointer(buffer.slice(offset: 0, length: length)))
                    }
                    guard checksum == extent.checksum else {
                        throw SpindleError(
                            .corrupted,
                            "the data for \(extent.length) bytes at \(extent.offset) is corrupt (checksum mismatch)",
                            operation: "import delta", path: path, offset: extent.position, length: extent.length)
                    }
                    try await target.write(from: buffer, range: 0..<length, at: extent.offset)
                    result.writtenBytes += extent.length
                } else {
                    try await target.discard(offset: extent.offset, length: extent.length)
                    result.skippedBytes += extent.length
                }
                result.totalBytes += extent.length
                progress?(BlockCopy.Progress(doneBytes: result.totalBytes, totalBytes: total))
            }
            try await target.flush()
            try await target.close()
            try await file.close()
            return result
        } catch {
            try? await target.close()
            try? await file.close()
            throw error
        }
    }

    /// A volume's own identity.
    func identity(of volumeName: String) async throws -> VolumeIdentity {
        guard let info = try await volumes().first(where: { $0.name == volumeName }) else {
            throw SpindleError(
                .notFound, "pool \(name) has no volume named '\(volumeName)'", path: "\(name)/\(volumeName)")
        }
        return VolumeIdentity(pool: self, volume: info)
    }
}
