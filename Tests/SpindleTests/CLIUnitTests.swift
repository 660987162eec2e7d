import Testing

@testable import Spindle
@testable import SpindleCLI

/// The command line's pure parts, in process (the commands themselves run as processes in CLITests).
@Suite("spindle command line, in process")
struct CLIUnitTests {
    @Test("scrub's report names read errors repaired and unreadable chunks; an unreadable chunk makes it exit 1")
    func scrubReportLines() {
        var report = RAIDArray.ScrubReport(checkedBytes: 4 << 20, mismatchOffsets: [], mismatches: 0, repaired: 0)
        report.readErrorsRepaired = 2
        #expect(!ArrayCommand.Scrub.foundProblems(report), "read errors repaired from redundancy are not a finding")
        report.unreadable = [.init(slot: 1, member: "m1.img", memberOffset: 65536)]
        #expect(ArrayCommand.Scrub.foundProblems(report))
        #expect(
            ArrayCommand.Scrub.describe(report, arrayName: "r5", repair: false) == [
                "scrubbed array r5: 4 MiB per member, 0 mismatched stripes, 2 read errors repaired, 1 unreadable chunks",
                "  unreadable: slot 1 (m1.img) at offset 65536 of its data area, with no redundancy left to rebuild it",
            ])
        report.mismatches = 1
        report.repaired = 1
        report.mismatchOffsets = [196608]
        report.unreadable = []
        #expect(ArrayCommand.Scrub.foundProblems(report))
        #expect(
            ArrayCommand.Scrub.describe(report, arrayName: "r5", repair: true) == [
                "scrubbed array r5: 4 MiB per member, 1 mismatched stripes, 1 repaired, 2 read errors repaired, 0 unreadable chunks",
                "  mismatch in the stripe at array offset 196608",
            ])
    }

    @Test("damaged headers and array states in the command line's words")
    func damagedHeaderWords() {
        let member = DamagedHeader(location: .device("/d/m1.img"), reason: .arraySuperblock(.invalid("member count 0")))
        #expect(PoolStore.describe(member) == "/d/m1.img: corrupt superblock: member count 0; not used")
        let label = DamagedHeader(
            location: .arrayStart(array: "r5", uuid: .zero, member: "/d/m0.img"), reason: .poolLabel(.checksumMismatch))
        #expect(
            PoolStore.describe(label)
                == "array:r5 (its first block, on /d/m0.img): damaged pool label: the thin pool label at offset 0 is corrupt (checksum mismatch); not used"
        )
        #expect(
            label.description
                == "array r5 (its first block, on /d/m0.img): damaged pool label: the thin pool label at offset 0 is corrupt (checksum mismatch)"
        )
        #expect(ArrayCommand.Status.Report.words(.dirty) == "dirty (not shut down cleanly, or in use)")
        #expect(ArrayCommand.Status.Report.words(.degraded) == "degraded")
    }
}
