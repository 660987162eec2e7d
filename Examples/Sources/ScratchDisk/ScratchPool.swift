import Glibc
import Spindle

/// The scratch disks of a folder: a thin pool in one sparse image file there, `scratch-pool.img`.
/// Disks are thin volumes: a 20 GiB disk takes pool space only as it is written.
final class ScratchPool {
    static let imageName = "scratch-pool.img"
    let image: FileDevice
    let pool: ThinPool

    private init(image: FileDevice, pool: ThinPool) {
        self.image = image
        self.pool = pool
    }

    /// Opens the folder's pool, or creates it (a sparse image of `sizeBytes`) when there is none.
    static func openOrCreate(
        folder: String, sizeBytes: UInt64 = 64 << 30, engine: IOEngine
    ) async throws -> ScratchPool {
        let path = "\(folder)/\(imageName)"
        if access(path, F_OK) == 0 {
            let image = try FileDevice.open(path: path, engine: engine)
            return ScratchPool(image: image, pool: try await ThinPool.open(devices: [image]))
        }
        let image = try FileDevice.create(path: path, sizeBytes: sizeBytes, engine: engine)
        do {
            return ScratchPool(image: image, pool: try await ThinPool.create(name: "scratch", devices: [image]))
        } catch {
            try? await image.close()
            unlink(path)
            throw error
        }
    }

    /// A new disk of `sizeBytes`.
    func makeDisk(name: String, sizeBytes: UInt64) async throws -> ThinVolume {
        let disk = try await pool.createVolume(name: name, sizeBytes: sizeBytes)
        for warning in try await pool.warnings() { print("warning: \(warning)") }
        return disk
    }

    /// A read-only snapshot of a disk, as it is now (no data is copied).
    func snapshot(disk: String, name: String) async throws -> ThinVolume {
        try await pool.snapshot(volume: disk, name: name, readOnly: true)
        return try await pool.openVolume(name: name)
    }

    /// Serves `disks` over NBD on a Unix socket at `socketPath` (only processes on this machine that
    /// may open the socket file can connect). Prints each disk's URI.
    func serve(_ disks: [ThinVolume], socketPath: String, engine: IOEngine) throws -> NBDServer {
        let server = try NBDServer(
            exports: disks.map { NBDServer.Export(name: $0.volumeName, device: $0) }, engine: engine,
            log: { print("nbd: \($0)") })
        try server.listen(unixSocket: socketPath)
        for disk in disks {
            let access = disk.isReadOnly ? "read-only" : "read-write"
            print("nbd+unix:///\(disk.volumeName)?socket=\(socketPath)  \(disk.capacityBytes >> 30) GiB, \(access)")
        }
        return server
    }

    /// Deletes disks; their space returns to the pool.
    func remove(_ names: [String]) async throws {
        for name in names { try await pool.deleteVolume(name: name) }
    }

    /// Commits the pool and closes its image.
    func close() async throws {
        try await pool.close()
        try await image.close()
    }
}
