"""What more than one test module uses: each module here is named for what it holds, and test
modules import from here (and take conftest's fixtures), never from one another."""
